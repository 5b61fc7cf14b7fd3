"""Fusion bundles end to end: train on real rows, export + verify, match, predict, rerank a search."""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import edgemm
from clirun import run_cli
from edgemm.runtime.datasets import EMOJI_FONT, emoji

pytestmark = pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="apt-get install fonts-noto-color-emoji")
BLOCKS = {"emoticons": (0x1F600, 0x1F64F), "transport": (0x1F680, 0x1F6FF), "symbols": (0x2600, 0x27BF)}


def _block(name: str) -> str | None:
    cp = ord(unicodedata.lookup(name.upper()))
    return next((b for b, (lo, hi) in BLOCKS.items() if lo <= cp <= hi), None)


@pytest.fixture(scope="module")
def emoji_rows(tmp_path_factory):
    """A real (image, text, label) CSV: emoji drawn by the Noto font, their Unicode names, their Unicode block."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("emoji-rows")
    (folder / "images").mkdir()
    rows = []
    per_block = dict.fromkeys(BLOCKS, 0)
    for name, rgb in emoji():
        block = _block(name)
        if block is None or per_block[block] >= 24:
            continue
        per_block[block] += 1
        file = f"{len(rows):03d}.png"
        Image.fromarray(rgb).save(folder / "images" / file)
        rows.append({"image": f"images/{file}", "text": name, "label": block})
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder, rows


@pytest.fixture(scope="module")
def trained(emoji_rows, tmp_path_factory):
    folder, _ = emoji_rows
    out = tmp_path_factory.mktemp("fusion") / "blocks"
    run = run_cli("train", "fusion", folder, "--architecture", "early", "--epochs", "15",
                  "--cache", out.parent / "cache", "-o", out, "--json", "-q")
    return out, json.loads(run.stdout)


def test_train_cli_writes_a_verified_bundle_that_classifies(trained, emoji_rows):
    out, result = trained
    report = result["report"]
    assert report["val_accuracy"] > 0.6 and report["epochs_run"] <= 15  # three blocks: chance is 1/3
    assert result["verification"]["passed"]
    model = edgemm.load(out, threads=1)
    assert isinstance(model, edgemm.FusionModel) and model.classes == tuple(sorted(BLOCKS))
    folder, rows = emoji_rows
    images, texts = [str(folder / r["image"]) for r in rows], [r["text"] for r in rows]
    preds = model.predict(images, texts, top_k=3)
    assert all(len(p) == 3 and abs(sum(x.score for x in p) - 1) < 1e-5 for p in preds)
    accuracy = np.mean([p[0].label == r["label"] for p, r in zip(preds, rows)])
    assert accuracy > 0.6  # three blocks: chance is 1/3
    with pytest.raises(edgemm.InputError, match="predict"):
        model.match(images[0], texts[0])


def test_train_reuses_cached_features(emoji_rows, trained, tmp_path):
    folder, _ = emoji_rows
    out = tmp_path / "again"
    cache = Path(trained[0]).parent / "cache"
    before = len(list(cache.rglob("*.npz")))
    run_cli("train", "fusion", folder, "--architecture", "gated", "--epochs", "2", "--cache", cache, "-o", out, "-q")
    assert len(list(cache.rglob("*.npz"))) == before and before > 0


def test_train_rejects_a_csv_with_missing_files_and_writes_nothing(emoji_rows, tmp_path):
    folder, rows = emoji_rows
    bad = tmp_path / "bad.csv"
    lines = ["image,text,label"] + [f"{folder / r['image']},{r['text']},{r['label']}" for r in rows[:10]]
    lines.append(f"{folder / 'images' / 'nope.png'},ghost,emoticons")
    bad.write_text("\n".join(lines) + "\n")
    run = run_cli("train", "fusion", bad, "-o", tmp_path / "out", "-q", check=False)
    assert run.returncode == 2 and "nope.png" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    """A matching head trained on real emoji pairs (positives and dual-encoder hard negatives), exported."""
    from edgemm.export.fusion_train import TrainOptions, train_head
    from edgemm.export.models.dual_encoder import default_towers, reference_pixels
    from edgemm.export.models.fusion import FusionConfig, tower_features
    from edgemm.export.models.fusion_bundle import build_fusion_bundle

    items = emoji()[:160]
    image, text, _ = default_towers()
    feats = tower_features(image, text, reference_pixels([rgb for _, rgb in items]), [n for n, _ in items])
    sim = feats["image_embedding"] @ feats["text_embedding"].T
    np.fill_diagonal(sim, -np.inf)
    n = len(items)
    hard = np.argsort(-sim, axis=1)[:, :3]
    img_rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), 3)])
    txt_rows = np.concatenate([np.arange(n), hard.reshape(-1)])
    targets = np.concatenate([np.ones(n), np.zeros(3 * n)]).astype(np.int64)
    config = FusionConfig.default("early")
    head, report = train_head(config, feats, targets, TrainOptions(epochs=20, seed=0), pairs=(img_rows, txt_rows))
    out = tmp_path_factory.mktemp("fusion") / "matcher"
    verify = {k: feats[k][:32] for k in ("image_embedding", "text_embedding")}
    build_fusion_bundle(out, head, config, task="matching", verify_features=verify, name="matcher")
    return edgemm.load(out, threads=1), head, feats, items


def test_match_agrees_with_the_pytorch_head_on_real_pairs(matcher):
    model, head, feats, items = matcher
    images, names = [rgb for _, rgb in items[:6]], [n for n, _ in items[:6]]
    got = model.match(images, names, color="rgb")
    with torch.no_grad():
        ref = torch.sigmoid(head.forward_named({k: torch.from_numpy(feats[k][:6]) for k in
                                                ("image_embedding", "text_embedding")}))[:, 0].numpy()
    assert got.shape == (6,) and np.abs(got - ref).max() < 5e-3  # runtime resize vs the PIL reference
    one = model.match(images[0], names[0], color="rgb")
    assert isinstance(one, float) and one == pytest.approx(float(got[0]), abs=1e-6)
    broadcast = model.match(images[0], names[:3], color="rgb")
    assert broadcast.shape == (3,) and broadcast[0] == pytest.approx(one, abs=1e-6)


def test_match_bad_input(matcher):
    model, _, _, items = matcher
    rgb = items[0][1]
    with pytest.raises(edgemm.InputError, match="2 images and 3 texts"):
        model.match([rgb, rgb], ["a", "b", "c"], color="rgb")
    with pytest.raises(edgemm.InputError, match="non-blank"):
        model.match(rgb, ["   "], color="rgb")
    with pytest.raises(edgemm.InputError, match="use match"):
        model.predict(rgb, "a")


def test_search_rerank_rescores_the_vector_hits_with_the_head(matcher):
    model, _, feats, items = matcher
    index = edgemm.VectorIndex(model.dim)
    index.add(feats["image_embedding"], ids=[n for n, _ in items])
    query = items[5][0]
    q = model.embed_texts([query])
    plain = index.search(q, k=5)[0]
    reranked = index.search(q, k=5, rerank=30, reranker=model.reranker([query]))[0]
    assert len(reranked) == 5 and all(0 <= h.score <= 1 for h in reranked)
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    candidates = {h.id for h in index.search(q, k=30)[0]}
    assert {h.id for h in reranked} <= candidates
    direct = model.match([rgb for n, rgb in items if n == reranked[0].id], query, color="rgb")
    assert float(direct[0]) == pytest.approx(reranked[0].score, abs=5e-3)  # stored vectors vs a fresh embedding
    assert plain[0].score <= 1 and len(plain) == 5
    with pytest.raises(edgemm.InputError, match="reranker"):
        index.search(q, k=5, rerank=30)
    with pytest.raises(edgemm.InputError, match="≥ k"):
        index.search(q, k=5, rerank=3, reranker=model.reranker([query]))
