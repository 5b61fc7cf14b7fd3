"""Users' captioner folders (ViT + GPT-2, BLIP): export, token-exact parity with transformers, bad folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemm
from edgemm.export.models.captioner import build_captioner_bundle
from edgemm.export.models.hf_captioner import CaptionCheckpoint, captioner_kind
from edgemm.runtime.datasets import sample_photos
from edgemm.runtime.errors import ExportError, VerificationError

# Decoding settings the parity tests run, beyond the export's own greedy / beam / prompted checks: every logits
# processor, beam search's length penalty in both directions, and each early-stopping rule.
SETTINGS = [
    dict(num_beams=3, length_penalty=-1.0),  # short hypotheses win: beams end early, at different steps
    dict(num_beams=3, length_penalty=0.0, early_stopping=True),
    dict(num_beams=2, length_penalty=2.0, early_stopping="never"),
    dict(no_repeat_ngram_size=2),
    dict(num_beams=4, no_repeat_ngram_size=3, repetition_penalty=1.3),
    dict(repetition_penalty=1.5, min_new_tokens=6),
    dict(num_beams=3, min_length=5, length_penalty=-0.5),
]


@pytest.fixture(scope="module")
def photos():
    return [p.image for p in sample_photos()]


@pytest.fixture(scope="module")
def vit_gpt2(tiny_vit_gpt2_dir):
    return CaptionCheckpoint(tiny_vit_gpt2_dir)


@pytest.fixture(scope="module")
def blip(tiny_blip_dir):
    return CaptionCheckpoint(tiny_blip_dir)


def test_vit_gpt2_bundle_is_verified(tiny_vit_gpt2_bundle, tiny_vit_gpt2_dir):
    man = edgemm.load(tiny_vit_gpt2_bundle, threads=1).manifest
    assert man.family == "captioner" and man.scoring is None and man.embedding_dim is None
    g = man.generation
    config = json.loads((tiny_vit_gpt2_dir / "generation_config.json").read_text())
    assert g.start_ids == [config["decoder_start_token_id"]] and g.eos_ids == [config["eos_token_id"]]
    assert g.settings == {"max_length": 16, "num_beams": 4} and not g.prompt and g.max_positions == 64
    assert set(man.graphs) == {"caption_encoder", "caption_decoder"}
    v = man.verification["generation"]
    assert v["greedy"]["identical_tokens"] == v["beam"]["identical_tokens"] == 15
    assert v["beam"]["settings"]["num_beams"] == 4  # the folder's own beams
    assert max(v["logits"]["max_abs_diff"].values()) < 1e-4 and v["logits"]["cached_steps"] >= 2
    assert man.verification["caption_decoder"]["max_abs_diff"]["logits"] < 1e-4
    assert man.source["architecture"] == "VisionEncoderDecoderModel"


def test_graphs_have_no_merged_decoder_and_an_empty_first_past(tiny_blip_bundle):
    import onnx
    import onnx.numpy_helper

    for role in ("caption_encoder", "caption_decoder"):
        graph = onnx.load(str(tiny_blip_bundle / f"{role}.onnx")).graph
        assert not [n for n in graph.node if n.op_type in ("If", "Loop")]
    dec = onnx.load(str(tiny_blip_bundle / "caption_decoder.onnx")).graph
    large = [onnx.numpy_helper.to_array(t) for t in dec.initializer if np.prod(t.dims) >= 30000 * 8]
    assert len(large) == 1  # the tied token embedding / LM head is stored once (the head reads it transposed)
    past = next(i for i in dec.input if i.name == "past_key_0")
    assert past.type.tensor_type.shape.dim[2].dim_param == "past"  # a dynamic past axis, 0 on the first step


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_vit_gpt2_tokens_equal_transformers(tiny_vit_gpt2_bundle, vit_gpt2, photos, settings):
    model = edgemm.load(tiny_vit_gpt2_bundle, threads=1)
    pixels = model.preprocess(photos, color="rgb")
    ours = model.caption(photos, color="rgb", batch_size=16, **settings)
    want = vit_gpt2.generate(pixels, {**vit_gpt2.settings, **settings})
    assert [c.token_ids for c in ours] == want


@pytest.mark.parametrize("settings", SETTINGS[:3] + SETTINGS[4:5], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_blip_tokens_equal_transformers(tiny_blip_bundle, blip, photos, settings):
    model = edgemm.load(tiny_blip_bundle, threads=1)
    pixels = model.preprocess(photos, color="rgb")
    ours = model.caption(photos, color="rgb", batch_size=16, **settings)
    assert [c.token_ids for c in ours] == blip.generate(pixels, {**blip.settings, **settings})
    prompted = model.caption(photos[:6], color="rgb", prompt="a picture of", **settings)
    assert [c.token_ids for c in prompted] == blip.generate(pixels[:6], {**blip.settings, **settings}, "a picture of")
    assert all(c.text.startswith("a picture of") for c in prompted)


def test_scores_equal_transformers(tiny_vit_gpt2_bundle, vit_gpt2, photos):
    """Beam search: transformers' sequences_scores; greedy: the same formula over its processed scores."""
    import torch

    model = edgemm.load(tiny_vit_gpt2_bundle, threads=1)
    pixels = torch.from_numpy(model.preprocess(photos[:6], color="rgb"))
    for beams in (1, 3):
        ours = model.caption(photos[:6], color="rgb", num_beams=beams, max_new_tokens=10)
        with torch.no_grad():
            out = vit_gpt2.model.generate(pixels, num_beams=beams, max_new_tokens=10, output_scores=True,
                                          return_dict_in_generate=True)
        if beams > 1:
            want = out.sequences_scores.numpy()
        else:
            logp = torch.stack([s.log_softmax(-1) for s in out.scores], 1)  # (batch, steps, vocab)
            chosen = logp.gather(2, out.sequences[:, 1:, None])[..., 0]
            lengths = torch.tensor([len(c.token_ids) - 1 for c in ours])
            mask = torch.arange(chosen.shape[1])[None] < lengths[:, None]
            want = ((chosen * mask).sum(1) / lengths).numpy()
        assert np.allclose([c.score for c in ours], want, atol=1e-4)


def test_parity_covers_captions_of_different_lengths(tiny_vit_gpt2_bundle, photos):
    """The tiny models must end captions at different steps, or the tests above would not see early ends."""
    model = edgemm.load(tiny_vit_gpt2_bundle, threads=1)
    for settings in ({"num_beams": 1}, SETTINGS[0]):
        lengths = {len(c.token_ids) for c in model.caption(photos, color="rgb", **settings)}
        assert len(lengths) >= 3, settings


def test_blip_text_equals_the_folders_tokenizer(tiny_blip_bundle, blip, photos):
    model = edgemm.load(tiny_blip_bundle, threads=1)
    for c in model.caption(photos[:5], color="rgb", prompt="a picture of"):
        assert c.text == blip.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_verification_catches_a_wrong_decoder(tiny_blip_dir, tmp_path):
    """A decoder whose attention scale is off exports and runs, but no longer says what the model says."""
    parts = CaptionCheckpoint(tiny_blip_dir).parts()
    parts.decoder.scale *= 1.5
    out = tmp_path / "bad"
    with pytest.raises(VerificationError, match="nothing was written"):
        build_captioner_bundle(parts, out)
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_unsupported_folders_are_refused(tiny_clip_dir, tiny_vit_gpt2_dir, tmp_path):
    with pytest.raises(ExportError, match="VisionEncoderDecoderModel.*BlipForConditionalGeneration"):
        captioner_kind(tiny_clip_dir)
    for change, match in ((lambda c: c["decoder"].update(model_type="bert"), "'bert' decoder"),
                          (lambda c: c.update(model_type="git", architectures=["GitForCausalLM"]), "'git' model")):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_vit_gpt2_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ExportError, match=match):
            captioner_kind(folder)


def test_other_blip_heads_are_refused_clearly(tiny_blip_dir, tmp_path):
    folder = tmp_path / "itm"
    shutil.copytree(tiny_blip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BlipForImageTextRetrieval"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="BlipForQuestionAnswering"):
        captioner_kind(folder)


@pytest.mark.parametrize("setting", [{"bad_words_ids": [[5]]}, {"num_beam_groups": 2, "diversity_penalty": 0.5},
                                     {"forced_eos_token_id": 3}])
def test_generation_settings_edgemm_does_not_implement_fail_the_export(tiny_vit_gpt2_dir, tmp_path, setting):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_vit_gpt2_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(ExportError, match=f"sets .*{next(iter(setting))}.*does not implement"):
        CaptionCheckpoint(folder)


def test_blip_vqa_answers_equal_transformers(tiny_blip_vqa_bundle, tiny_vit_gpt2_bundle, photos):
    """Visual question answering: a question graph between the image graph and the decoder, the same parity."""
    model = edgemm.load(tiny_blip_vqa_bundle, threads=1)
    man = model.manifest
    assert set(man.graphs) == {"caption_encoder", "question_encoder", "caption_decoder"}
    assert man.generation.question_graph == "question_encoder"
    v = man.verification["generation"]
    assert v["greedy"]["identical_tokens"] == v["beam"]["identical_tokens"] == 15 and v["question"]
    ck = CaptionCheckpoint(man.source["path"])
    pixels = model.preprocess(photos[:6], color="rgb")
    for question in ("how many dogs are in the picture?", "is it raining?"):
        for settings in ({"num_beams": 1}, {"num_beams": 3, "length_penalty": -1.0}):
            ours = model.answer(photos[:6], question, color="rgb", **settings)
            assert [c.token_ids for c in ours] == ck.generate(pixels, {**ck.settings, **settings}, question)
    with pytest.raises(edgemm.InputError, match="answer"):
        model.caption(photos[0])
    with pytest.raises(edgemm.InputError, match="question must be"):
        model.answer(photos[0], "  ")
    with pytest.raises(edgemm.InputError, match="answers no questions"):
        edgemm.load(tiny_vit_gpt2_bundle, threads=1).answer(photos[0], "what?")
