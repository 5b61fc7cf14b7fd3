"""The Captioner users hold: batching, streaming, sampling, bad input and tampered bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemm
from edgemm.runtime.datasets import sample_photos
from edgemm.runtime.errors import BundleError, InputError

from clirun import run_cli


@pytest.fixture(scope="module")
def photos():
    return [p.image for p in sample_photos()]


@pytest.fixture(scope="module")
def blip_model(tiny_blip_bundle):
    return edgemm.load(tiny_blip_bundle, threads=1)


@pytest.fixture(scope="module")
def gpt2_model(tiny_vit_gpt2_bundle):
    return edgemm.load(tiny_vit_gpt2_bundle, threads=1)


def test_a_batch_gives_each_image_its_own_caption(gpt2_model, photos):
    """Rows leave the batch as they finish; the others must not notice."""
    for settings in ({"num_beams": 1}, {"num_beams": 3, "length_penalty": -1.0}):
        batch = gpt2_model.caption(photos[:7], color="rgb", batch_size=7, **settings)
        alone = [gpt2_model.caption(p, color="rgb", **settings) for p in photos[:7]]
        assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
        assert len({len(c.token_ids) for c in batch}) > 1  # some finished before others


def test_bgr_frames_and_files(gpt2_model, photos, tmp_path):
    from PIL import Image

    rgb = photos[2]
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    want = gpt2_model.caption(rgb, color="rgb").token_ids
    assert gpt2_model.caption(rgb[:, :, ::-1].copy()).token_ids == want  # an OpenCV BGR frame
    assert gpt2_model.caption(str(path)).token_ids == want


def test_stream_pieces_join_to_the_caption(blip_model, photos):
    for prompt in (None, "a picture of"):
        pieces = list(blip_model.caption_stream(photos[3], color="rgb", prompt=prompt, max_new_tokens=12))
        caption = blip_model.caption(photos[3], color="rgb", prompt=prompt, max_new_tokens=12)
        assert "".join(pieces) == caption.text
        assert len(pieces) > 3 and all(p.endswith(" ") for p in pieces[:-1])


def test_stream_refuses_beams_and_lists(blip_model, photos):
    with pytest.raises(InputError, match="beam search"):
        next(blip_model.caption_stream(photos[0], num_beams=3))
    with pytest.raises(InputError, match="one image"):
        next(blip_model.caption_stream(photos[:2]))


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt2_model, photos):
    greedy = gpt2_model.caption(photos[:4], color="rgb", num_beams=1)
    one = gpt2_model.caption(photos[:4], color="rgb", num_beams=1, do_sample=True, top_k=1, seed=3)
    assert [c.token_ids for c in one] == [c.token_ids for c in greedy]
    a = gpt2_model.caption(photos[:4], color="rgb", num_beams=1, do_sample=True, temperature=2.0, seed=7)
    b = gpt2_model.caption(photos[:4], color="rgb", num_beams=1, do_sample=True, temperature=2.0, seed=7)
    c = gpt2_model.caption(photos[:4], color="rgb", num_beams=1, do_sample=True, temperature=2.0, seed=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]
    nucleus = gpt2_model.caption(photos[:4], color="rgb", num_beams=1, do_sample=True, top_p=0.5, seed=1)
    assert all(len(x.token_ids) > 1 for x in nucleus)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer ≥ 1"),
    (dict(num_beams=0), "num_beams must be an integer ≥ 1"),
    (dict(num_beams=2.5), "num_beams must be an integer"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=3), "prompt must be a string"),
    (dict(max_new_tokens=500), "positions"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=0), "temperature"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(beams=3), "unknown generation settings"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_settings_are_input_errors(blip_model, photos, kwargs, match):
    with pytest.raises(InputError, match=match):
        blip_model.caption(photos[0], color="rgb", **kwargs)


def test_a_prompt_on_a_model_without_one_is_an_input_error(gpt2_model, photos):
    with pytest.raises(InputError, match="takes no prompt"):
        gpt2_model.caption(photos[0], prompt="a picture of")


def test_bad_images_are_input_errors(gpt2_model, tmp_path):
    with pytest.raises(InputError):
        gpt2_model.caption(np.zeros((0, 5, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    with pytest.raises(InputError):
        gpt2_model.caption(str(tmp_path / "broken.jpg"))
    with pytest.raises(InputError, match="no images"):
        gpt2_model.caption([])


def _tamper(bundle, tmp_path, change):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    change(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("change,match", [
    (lambda m: m["generation"]["cache"].update(past_key_0="present_key_9"), "present_key_9"),
    (lambda m: m["generation"]["memory"].append("cross_key_7"), "cross_key_7"),
    (lambda m: m["generation"].update(eos_ids=[10 ** 6]), "token id"),
    (lambda m: m["generation"].update(tokenizer="../tokenizer.json"), r"'\.\.'"),
    (lambda m: m["generation"]["settings"].update(num_beams=0), "generation.settings"),
    (lambda m: m["generation"]["settings"].update(beams=2), "generation.settings"),
    (lambda m: m.pop("generation"), "generation"),
    (lambda m: m["graphs"].pop("caption_decoder"), "caption_decoder"),
])
def test_tampered_manifests_are_bundle_errors(tiny_blip_bundle, tmp_path, change, match):
    with pytest.raises(BundleError, match=match):
        edgemm.load(_tamper(tiny_blip_bundle, tmp_path, change), check_hashes=False)


def test_cli_caption_and_info(tiny_blip_bundle, photos, tmp_path):
    from PIL import Image

    for i in range(2):
        Image.fromarray(photos[i]).save(tmp_path / f"p{i}.png")
    result = run_cli("caption", str(tmp_path), "--bundle", str(tiny_blip_bundle), "--beams", "2",
                     "--max-new-tokens", "6", "--prompt", "a picture of", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    model = edgemm.load(tiny_blip_bundle)
    want = model.caption([str(tmp_path / "p0.png"), str(tmp_path / "p1.png")], num_beams=2, max_new_tokens=6,
                         prompt="a picture of")
    assert [r["token_ids"] for r in rows] == [c.token_ids for c in want]
    info = run_cli("info", str(tiny_blip_bundle))
    assert info.returncode == 0 and "identical token ids to transformers generate()" in info.stdout
    assert "takes prompt" in info.stdout
    bad = run_cli("caption", str(tmp_path / "p0.png"), "--bundle", str(tiny_blip_bundle), "--prompt", "", check=False)
    assert bad.returncode == 2 and "prompt is empty" in bad.stderr


def test_commands_refuse_the_wrong_kind_of_bundle(tiny_blip_bundle, default_bundle, photos, tmp_path):
    from PIL import Image

    Image.fromarray(photos[0]).save(tmp_path / "p.png")
    wrong = run_cli("classify", str(tmp_path / "p.png"), "--bundle", str(tiny_blip_bundle), check=False)
    assert wrong.returncode == 2 and "is a captioner bundle" in wrong.stderr and "edgemm caption" in wrong.stderr
    wrong = run_cli("caption", str(tmp_path / "p.png"), "--bundle", str(default_bundle), check=False)
    assert wrong.returncode == 2 and "needs a captioner bundle" in wrong.stderr


def test_cli_answers_a_question(tiny_blip_vqa_bundle, photos, tmp_path):
    from PIL import Image

    Image.fromarray(photos[1]).save(tmp_path / "cat.png")
    out = run_cli("caption", str(tmp_path / "cat.png"), "--bundle", str(tiny_blip_vqa_bundle), "--question",
                  "what animal is this?", "--json")
    want = edgemm.load(tiny_blip_vqa_bundle).answer(str(tmp_path / "cat.png"), "what animal is this?")
    assert json.loads(out.stdout)[0]["token_ids"] == want.token_ids
