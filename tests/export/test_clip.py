"""Users' own CLIP / SigLIP folders: export, verification against transformers, and bad folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import edgemm
from edgemm.export.models.clip import build_clip_bundle, checkpoint_type, image_preprocess_from_processor
from edgemm.runtime.datasets import sample_photos
from edgemm.runtime.errors import ExportError


def _hf_probs(folder, model_class, images_rgb, labels, prompt, *, sigmoid):
    """What transformers itself answers: the independent reference for scores."""
    import transformers
    from PIL import Image

    model = getattr(transformers, model_class).from_pretrained(str(folder)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    padding = "max_length" if sigmoid else True
    text = tokenizer([prompt.format(label) for label in labels], padding=padding, return_tensors="pt")
    pixels = processor(images=[Image.fromarray(im) for im in images_rgb], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=text["input_ids"], pixel_values=pixels,
                       **({} if sigmoid else {"attention_mask": text["attention_mask"]})).logits_per_image
    return (torch.sigmoid(logits) if sigmoid else logits.softmax(-1)).numpy()


def test_clip_bundle_matches_transformers(tiny_clip_dir, tiny_clip_bundle):
    m = edgemm.load(tiny_clip_bundle, threads=1)
    man = m.manifest
    assert man.scoring.kind == "cosine"
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    assert man.scoring.logit_scale == pytest.approx(np.exp(config.get("logit_scale_init_value", 2.6592)), rel=1e-5)
    assert man.embedding_dim == config["projection_dim"]  # the projection is inside the graph
    assert man.text.max_length == 77 and man.text.padding == "longest" and man.text.pad_id == 49407
    assert man.image.resize == "crop" and man.image.interpolation == "bicubic"
    assert man.image.mean[0] == pytest.approx(0.48145466 * 255)
    assert man.source["kind"] == "huggingface" and man.source["path"] == str(tiny_clip_dir)
    checks = man.verification
    assert checks["image_encoder"]["max_abs_diff"]["embedding"] < 1e-5
    assert checks["text_encoder"]["max_abs_diff"]["embedding"] < 1e-5
    assert checks["tokenizer"]["identical_ids"] and checks["tokenizer"]["texts"] > 70
    assert checks["preprocessing"]["embedding_cosine_mean"] > 0.98

    emb = m.embed_texts(["a photo of a cat"])
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    ids = m.tokenizer(["a photo of a cat"])["input_ids"][0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # the ids real CLIP checkpoints use

    photos = [p.image for p in sample_photos()[:4]]
    labels = ["cat", "rocket", "cup of coffee"]
    ours = m.scores(photos, labels, color="rgb")
    ref = _hf_probs(tiny_clip_dir, "CLIPModel", photos, labels, man.labels.prompt, sigmoid=False)
    assert np.allclose(ours.sum(1), 1, atol=1e-5)
    assert np.abs(ours - ref).max() < 0.02  # our cv2 preprocessing vs the processor's PIL bicubic


def test_siglip_bundle_uses_sigmoid_and_fixed_length_text(tiny_siglip_dir, tmp_path):
    assert not (tiny_siglip_dir / "tokenizer.json").exists()  # only a SentencePiece model, as on the hub
    build_clip_bundle(tiny_siglip_dir, tmp_path / "b")
    m = edgemm.load(tmp_path / "b", threads=1)
    man = m.manifest
    assert man.scoring.kind == "sigmoid" and man.text.padding == "max_length"
    assert man.image.resize == "squash"
    assert [t.name for t in man.graphs["text_encoder"].inputs] == ["input_ids"]
    assert m.tokenizer(["Hello, World!"])["input_ids"].shape == (1, man.text.max_length)
    photos = [p.image for p in sample_photos()[:3]]
    labels = ["cat", "rocket"]
    ours = m.scores(photos, labels, color="rgb")
    ref = _hf_probs(tiny_siglip_dir, "SiglipModel", photos, labels, man.labels.prompt, sigmoid=True)
    assert np.abs(ours - ref).max() < 0.02
    assert not np.allclose(ours.sum(1), 1)  # independent per-label probabilities


def test_processor_config_mapping():
    clip = image_preprocess_from_processor(
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
         "image_mean": [0.5] * 3, "image_std": [0.25] * 3, "rescale_factor": 1 / 255, "resample": 2}, 224)
    assert clip.crop_fraction == pytest.approx(224 / 256) and clip.size == 224 and clip.resize == "crop"
    assert clip.mean == pytest.approx([127.5] * 3) and clip.std == pytest.approx([63.75] * 3)
    assert clip.interpolation == "bilinear"
    with pytest.raises(ExportError, match="not square"):
        image_preprocess_from_processor({"size": {"height": 224, "width": 256}}, 224)
    with pytest.raises(ExportError, match="do not belong together"):
        image_preprocess_from_processor({"size": {"height": 224, "width": 224}}, 384)


def _no_partial(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_bad_folders_are_clear_errors_and_leave_nothing(tiny_clip_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="not a directory"):
        build_clip_bundle(tmp_path / "missing", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        build_clip_bundle(empty, out)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ExportError, match="'bert' checkpoint.*clip"):
        checkpoint_type(bert)
    no_processor = tmp_path / "no-processor"
    shutil.copytree(tiny_clip_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="no preprocessor_config.json"):
        build_clip_bundle(no_processor, out)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_clip_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no weights"):
        build_clip_bundle(no_weights, out)
    _no_partial(out)


def test_cli_exports_clip(tiny_clip_dir, tmp_path, capsys):
    from edgemm._cli import main

    assert main(["export", "clip", "--from", str(tiny_clip_dir), "-o", str(tmp_path / "b"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "verified tokenizer: identical ids" in printed and "verified image_encoder" in printed
    assert main(["export", "clip", "-o", str(tmp_path / "c")]) == 2
    assert "needs --from" in capsys.readouterr().err
    _no_partial(tmp_path / "c")
