"""Bundles that are missing, altered or too new are refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import edgemm
from edgemm.runtime.bundle import Bundle, sha256_file
from edgemm.runtime.errors import BundleError
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import SCHEMA_VERSION


def _edit_manifest(path, change):
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


def test_default_bundle_opens(default_bundle):
    assert Bundle(default_bundle).manifest.name == "default"


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist.*edgemm export default"):
        Bundle(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="not an edgemm bundle"):
        Bundle(tmp_path)


def test_altered_file_is_refused(bundle_copy):
    with open(bundle_copy / "labels.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="labels.json' does not match the hash"):
        Bundle(bundle_copy)
    Bundle(bundle_copy, check_hashes=False)  # an explicit opt-out still opens it


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="incomplete: 'tokenizer.json' is missing"):
        Bundle(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this edgemm understands.*Upgrade edgemm"):
        Bundle(bundle_copy)


def test_malformed_manifest_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.pop("graphs"))
    with pytest.raises(BundleError, match="manifest field 'graphs' is missing"):
        Bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        Bundle(bundle_copy)


def test_truncated_onnx_file_is_refused_before_loading(bundle_copy):
    onnx_file = bundle_copy / "image_encoder.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(BundleError, match="image_encoder.onnx' does not match"):
        Bundle(bundle_copy)


def test_schema_1_bundles_still_open(bundle_copy):
    """Bundles written before schema 2 lack the new fields; their defaults keep them meaning the same."""
    def downgrade(d):
        d["schema_version"] = 1
        d["image"].pop("resize")
        d["text"].pop("padding")
        d["scoring"].pop("logit_bias")

    _edit_manifest(bundle_copy, downgrade)
    m = Bundle(bundle_copy).manifest
    assert m.schema_version == 1 and m.image.resize == "crop" and m.text.padding == "longest"


# -- a manifest is untrusted: every file it names stays inside the bundle ---------------------


def _point(bundle, field_path: list[str], target: str, source_file: str):
    """Point a manifest field at ``target``, listing it with the right hash, as an attacker would."""
    def change(d):
        entry = d
        for key in field_path[:-1]:
            entry = entry[key]
        entry[field_path[-1]] = target
        d["files"][target] = sha256_file(bundle / source_file)
    _edit_manifest(bundle, change)


@pytest.mark.parametrize("field_path, field, source", [
    (["graphs", "image_encoder", "file"], "graphs.image_encoder.file", "image_encoder.onnx"),
    (["text", "tokenizer"], "text.tokenizer", "tokenizer.json"),
    (["labels", "file"], "labels.file", "labels.json"),
    (["scoring", "class_embeddings"], "scoring.class_embeddings", "class_embeddings.npy"),
])
def test_a_field_naming_a_file_outside_the_bundle_is_refused(bundle_copy, tmp_path, field_path, field, source):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle_copy / source, outside / "evil")
    _point(bundle_copy, field_path, "../outside/evil", source)
    with pytest.raises(BundleError, match=rf"'{field}' '\.\./outside/evil' has '\.\.'"):
        edgemm.load(bundle_copy)
    _point(bundle_copy, field_path, str(outside / "evil"), source)
    with pytest.raises(BundleError, match=rf"'{field}' .* is an absolute path"):
        edgemm.load(bundle_copy)


def test_etc_passwd_is_not_read_as_a_tokenizer(bundle_copy):
    passwd = "/etc/passwd"
    def change(d):
        d["text"]["tokenizer"] = passwd
        d["files"][passwd] = sha256_file(passwd)
    _edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match="'text.tokenizer' '/etc/passwd' is an absolute path"):
        Bundle(bundle_copy)


def test_a_symlink_leading_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    """The hash matches (the same bytes), but the file lives outside: the link is refused, not followed."""
    outside = tmp_path / "labels-elsewhere.json"
    shutil.copy(bundle_copy / "labels.json", outside)
    (bundle_copy / "labels.json").unlink()
    (bundle_copy / "labels.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"'labels.json' \(labels.file\) resolves to .*outside the bundle"):
        Bundle(bundle_copy)


def test_a_symlink_inside_the_bundle_is_followed(bundle_copy):
    (bundle_copy / "data").mkdir()
    (bundle_copy / "labels.json").rename(bundle_copy / "data" / "labels.json")
    (bundle_copy / "labels.json").symlink_to("data/labels.json")
    bundle = Bundle(bundle_copy)
    assert bundle.file("labels.json") == (bundle_copy / "data" / "labels.json").resolve()
    assert list(bundle.read_labels("labels.json", "labels.file")) == json.loads((bundle_copy / "labels.json").read_text())


def test_a_listed_fifo_is_refused_without_blocking(bundle_copy):
    os.mkfifo(bundle_copy / "pipe")
    _edit_manifest(bundle_copy, lambda d: d["files"].update(pipe="0" * 64))
    with pytest.raises(BundleError, match="'pipe' \\(files\\) is not a regular file"):
        Bundle(bundle_copy)


def test_onnx_external_data_outside_the_bundle_is_refused_by_onnx_runtime(bundle_copy, tmp_path):
    """ONNX Runtime confines a graph's external-data files to the graph's folder; edgemm keeps it so."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((3, 384), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels_flat", "w"], ["embedding"])], "g",
        [helper.make_tensor_value_info("pixels_flat", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 384])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").rename(tmp_path.parent / "outside.bin")
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    next(e for e in model.graph.initializer[0].external_data if e.key == "location").value = "../outside.bin"
    onnx.save(model, str(tmp_path / "m.onnx"))
    from edgemm.runtime.backends import open_backend

    with pytest.raises(edgemm.BackendError, match="could not load"):
        open_backend(tmp_path / "m.onnx", "onnxruntime")


# -- manifest values are checked at load --------------------------------------------------------


@pytest.mark.parametrize("section, key, value, field", [
    ("image", "mean", [127.0, 127.0], "image.mean"),
    ("image", "std", [128.0, 0.0, 128.0], "image.std"),
    ("image", "std", [128.0, float("nan"), 128.0], "NaN"),
    ("image", "crop_fraction", 0.0, "image.crop_fraction"),
    ("image", "crop_fraction", 1.5, "image.crop_fraction"),
    ("image", "size", -224, "image.size"),
    ("scoring", "tau", 0.0, "scoring.tau"),
    ("scoring", "tau", -0.05, "scoring.tau"),
    ("scoring", "logit_scale", -100.0, "scoring.logit_scale"),
    ("scoring", "kind", "dot", "scoring.kind"),
    ("scoring", "audio_weight", 1.5, "scoring.audio_weight"),
    ("labels", "prompt", "a photo of a {} and a {}", "labels.prompt"),
    ("labels", "prompt", "a photo", "labels.prompt"),
    ("labels", "prompt", "a photo of {0.__class__}", "labels.prompt"),
    ("text", "max_length", 0, "text.max_length"),
    ("text", "padding", "left", "text.padding"),
    (None, "schema_version", 0, "schema_version"),
    (None, "schema_version", "2", "schema_version"),
    (None, "schema_version", True, "schema_version"),
    (None, "embedding_dim", "384", "embedding_dim"),
])
def test_bad_manifest_values_are_refused_naming_the_field(bundle_copy, section, key, value, field):
    _edit_manifest(bundle_copy, lambda d: (d[section] if section else d).update({key: value}))
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        Bundle(bundle_copy)


def test_duplicate_json_keys_are_refused(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace('"name": "default"', '"name": "default", "name": "x"', 1))
    with pytest.raises(BundleError, match="key 'name' appears twice"):
        Bundle(bundle_copy)


def test_deeply_nested_manifest_is_a_bundle_error(bundle_copy):
    (bundle_copy / "manifest.json").write_text('{"schema_version": 2, "source": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="nests too deeply to parse"):
        Bundle(bundle_copy)


def test_oversized_manifest_and_labels_are_refused_before_parsing(bundle_copy, monkeypatch):
    monkeypatch.setattr(LIMITS, "max_json_bytes", 1000)
    with pytest.raises(BundleError, match="larger than 1000 bytes; raise edgemm.limits.max_json_bytes"):
        Bundle(bundle_copy)


@pytest.mark.parametrize("labels, why", [
    ({"cat": 1}, "JSON list"), (["cat", "cat"], "unique"), (["cat", " "], "non-blank"), ([], "JSON list"),
])
def test_bad_label_files_are_refused(bundle_copy, labels, why):
    (bundle_copy / "labels.json").write_text(json.dumps(labels))
    _edit_manifest(bundle_copy, lambda d: d["files"].update({"labels.json": sha256_file(bundle_copy / "labels.json")}))
    with pytest.raises(BundleError, match=f"labels.file 'labels.json' must be a {why}" if why == "JSON list"
                       else "must be a JSON list of unique, non-blank strings"):
        edgemm.load(bundle_copy)


def test_class_embeddings_declaring_a_huge_shape_are_refused_before_allocating(bundle_copy):
    import numpy as np

    path = bundle_copy / "class_embeddings.npy"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = (10**9, 384)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 4096)
    _edit_manifest(bundle_copy, lambda d: d["files"].update({"class_embeddings.npy": sha256_file(path)}))
    with pytest.raises(BundleError, match="class_embeddings.npy' is not a readable .npy array"):
        edgemm.load(bundle_copy)


def test_a_bundle_whose_graphs_run_elsewhere_opens_without_them(bundle_copy):
    """The Python models of a Triton repository hold the bundle without its graphs (Triton runs those)."""
    for onnx in bundle_copy.glob("*.onnx"):
        onnx.unlink()
    with pytest.raises(BundleError, match="incomplete"):
        Bundle(bundle_copy)
    bundle = Bundle(bundle_copy, graphs=False)
    assert bundle.graph_path("image_encoder") == bundle_copy.resolve() / "image_encoder.onnx"
    (bundle_copy / "tokenizer.json").unlink()  # every other file is still required and checked
    with pytest.raises(BundleError, match="tokenizer.json"):
        Bundle(bundle_copy, graphs=False)
