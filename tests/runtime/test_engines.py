"""TensorRT engines' pure logic on real manifests: profiles, cache keys, sidecars, staleness."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edgemm.runtime import engines
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BackendError, InputError


def _key(manifest, role="image_encoder", **changes):
    ranges = engines.axis_ranges(manifest)
    key = engines.EngineKey(role=role, onnx_sha256=manifest.files[manifest.graphs[role].file], precision="fp16",
                            tensorrt="tensorrt 10.13.0", gpu="NVIDIA Orin", compute_capability="8.7",
                            profile=engines.graph_profile(manifest.graphs[role], ranges).to_dict(), flags=["fp16"])
    return replace(key, **changes)


def test_profiles_from_the_default_bundle(default_bundle):
    m = Bundle(default_bundle).manifest
    ranges = engines.axis_ranges(m)
    assert ranges == {"batch": (1, 8, 32), "seq": (1, 16, m.text.max_length)}
    image = engines.graph_profile(m.graphs["image_encoder"], ranges)
    assert image.shapes["pixels"] == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    text = engines.graph_profile(m.graphs["text_encoder"], ranges)
    assert text.shapes["input_ids"] == ((1, 1), (8, 16), (32, 256))
    assert set(text.shapes) == {"input_ids", "attention_mask"}


def test_captioner_profiles_have_an_empty_first_past(tiny_blip_bundle):
    m = Bundle(tiny_blip_bundle).manifest
    ranges = engines.axis_ranges(m, engines.parse_axis_overrides(["batch=1:4:8"]))
    assert ranges["batch"] == (1, 4, 8) and ranges["past"] == (0, 16, m.generation.max_positions - 1)
    assert ranges["tokens"][2] == m.generation.max_positions
    past = engines.graph_profile(m.graphs["caption_decoder"], ranges).shapes["past_key_0"]
    assert past[0][2] == 0 and past[2][2] == m.generation.max_positions - 1


@pytest.mark.parametrize("items,match", [(["batch=8:1:32"], "MIN ≤ OPT ≤ MAX"), (["batch=1-8-32"], "NAME=MIN"),
                                         (["batch"], "NAME=MIN")])
def test_bad_overrides(items, match):
    with pytest.raises(InputError, match=match):
        engines.parse_axis_overrides(items)


def test_an_override_of_an_axis_no_graph_has_is_refused(default_bundle):
    with pytest.raises(InputError, match="name no dynamic axis"):
        engines.axis_ranges(Bundle(default_bundle).manifest, {"tokens": (1, 1, 4)})


def test_every_key_field_changes_the_engine(default_bundle):
    m = Bundle(default_bundle).manifest
    base = _key(m)
    variants = [_key(m, precision="fp32"), _key(m, tensorrt="tensorrt 10.14.1"), _key(m, gpu="NVIDIA H100"),
                _key(m, compute_capability="9.0"), _key(m, onnx_sha256="0" * 64), _key(m, flags=["fp16", "int8"]),
                _key(m, role="text_encoder"),
                _key(m, profile=engines.graph_profile(m.graphs["image_encoder"], {"batch": (1, 1, 1)}).to_dict())]
    digests = {v.digest() for v in variants}
    assert base.digest() not in digests and len(digests) == len(variants)
    assert base.file_stem().startswith("image_encoder.fp16.")
    assert base.differences(_key(m, gpu="NVIDIA H100")) == ["gpu: engine has 'NVIDIA H100', now 'NVIDIA Orin'"]


def test_sidecar_round_trip_and_staleness(default_bundle, tmp_path):
    m = Bundle(default_bundle).manifest
    key = _key(m)
    plan = tmp_path / f"{key.file_stem()}.plan"
    assert engines.check_engine(plan, key) == [f"no engine at {plan}"]
    plan.write_bytes(b"plan bytes")  # a plain plan: nothing but the engine
    plan.with_suffix(".json").write_text(json.dumps(engines.sidecar(key, build_seconds=12.345,
                                                                     verification={"max_abs_diff": 1e-3})))
    assert engines.check_engine(plan, key) == []
    got, record = engines.read_sidecar(plan.with_suffix(".json"))
    assert got == key and record["build_seconds"] == 12.35
    newer = _key(m, tensorrt="tensorrt 10.14.1")
    assert engines.check_engine(plan, newer) == ["tensorrt: engine has 'tensorrt 10.13.0', now 'tensorrt 10.14.1'"]


@pytest.mark.parametrize("content,match", [
    ("{", "cannot be read as JSON"),
    ('{"key": {}, "key": {}}', "appears twice"),
    ('{"sidecar_version": 99, "key": {}}', "version 99"),
    ('{"sidecar_version": 1, "key": {"role": "x"}}', "malformed key"),
    ("[1]", "no key"),
])
def test_hostile_sidecars_are_refused(tmp_path, content, match):
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(BackendError, match=match):
        engines.read_sidecar(path)


def test_an_edited_sidecar_is_stale(default_bundle, tmp_path):
    m = Bundle(default_bundle).manifest
    key = _key(m)
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x")
    record = engines.sidecar(key, build_seconds=1, verification={})
    record["key"]["gpu"] = "NVIDIA H100"  # the digest no longer matches
    plan.with_suffix(".json").write_text(json.dumps(record))
    assert "digest does not match" in engines.check_engine(plan, key)[0]


def test_engines_go_beside_a_writable_bundle_else_home(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert engines.engine_dir(bundle, tmp_path / "home") == bundle.resolve() / "engines"
    read_only = engines.engine_dir("/proc/self", tmp_path / "home")  # no one, not even root, writes there
    assert read_only.parent == tmp_path / "home" / "engines" and read_only.name.startswith(Path("/proc/self").resolve().name)
