"""The built-in captioner's parts: committed weights, image encoder export, and captions of real photos."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edgemm.export.models.default_captioner import (WEIGHTS, CaptionImageEncoder, GenerationSettings,
                                                    apply_decoder_changes, default_captioner, load_caption_weights,
                                                    plain, sentence, with_article)
from edgemm.runtime.errors import ExportError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def captioner():
    torch.set_num_threads(1)
    return default_captioner()


def test_caption_phrasing():
    assert with_article("tabby cat") == "a tabby cat"
    assert with_article("umbrella") == "an umbrella"
    assert with_article("sparkles") == "sparkles"
    assert with_article("dress") == "a dress"
    assert sentence("a tabby cat") == " A tabby cat."
    assert plain(" A tabby cat.") == "a tabby cat"


def test_committed_weights_fit_the_budget_and_carry_their_record():
    assert WEIGHTS.stat().st_size <= 4 << 20
    adapter, changes, record = load_caption_weights()
    assert record["seed"] == 0 and record["validation"]["best"]["cider_d"] > 0
    assert set(record["generation"]) == {"max_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty"}
    assert all(k.startswith(("decoder.", "lora.")) for k in changes)
    out = adapter(torch.zeros(2, 384))
    assert out.shape == (2, adapter.config.tokens, 384)


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(ExportError, match="not at"):
        load_caption_weights(tmp_path / "absent.npz")
    np.savez(tmp_path / "bare.npz", x=np.zeros(3))
    with pytest.raises(ExportError, match="no training record"):
        load_caption_weights(tmp_path / "bare.npz")
    from edgemm.export.models.whisper_decoder import whisper_text_decoder

    with pytest.raises(ExportError, match="does not have"):
        apply_decoder_changes(whisper_text_decoder(), {"decoder.model.nothing.weight": np.zeros(3, np.float32)})


def test_parts_and_interface(captioner):
    assert isinstance(captioner.image_encoder, CaptionImageEncoder)
    assert type(captioner.decoder).__name__ == "WhisperForCausalLM"
    assert captioner.prompt_ids == (50257, 50362) and captioner.eos_id == 50256
    assert captioner.tokenizer.name == "tokenizer.json" and captioner.tokenizer.is_file()


def test_sample_photos_get_sensible_captions(captioner):
    """Real photos the adapter never saw: the cat and the coffee must be named (ImageNet-like subjects)."""
    from edgemm.export.models.dual_encoder import reference_pixels
    from edgemm.runtime.datasets import sample_photos

    photos = {p.name: p.image for p in sample_photos()}
    pixels = torch.from_numpy(reference_pixels([photos["skimage.chelsea"], photos["skimage.coffee"]]))
    cat, coffee = [c.lower() for c in captioner.caption(pixels, GenerationSettings())]
    assert "cat" in cat, cat
    assert any(w in coffee for w in ("coffee", "espresso", "cup")), coffee


def test_image_encoder_exports_to_onnx_with_a_dynamic_batch(captioner, tmp_path):
    import onnxruntime as ort

    from edgemm.export.models.dual_encoder import reference_pixels
    from edgemm.runtime.datasets import sample_photos

    path = tmp_path / "caption_encoder.onnx"
    module = captioner.image_encoder.eval()
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(2, 3, 224, 224),), str(path), input_names=["pixels"],
                          output_names=["encoder_hidden_states"],
                          dynamic_axes={"pixels": {0: "batch"}, "encoder_hidden_states": {0: "batch"}},
                          opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = reference_pixels([p.image for p in sample_photos()[:3]])
    got = session.run(None, {"pixels": pixels})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(pixels)).numpy()
    assert got.shape == want.shape == (3, captioner.image_encoder.adapter.config.tokens, 384)
    assert np.abs(got - want).max() < 1e-3
