"""The built-in matching model: committed head weights, built into a verified bundle, measured on held-out emoji."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import edgemm
from clirun import run_cli
from sessions import spinning_entry
from edgemm.export.models.matching import (CONFIG, PROMPT, build_matching_bundle, load_matching_head,
                                           permutation_pairs, split_rows)
from edgemm.runtime.datasets import EMOJI_FONT, emoji

pytestmark = pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="apt-get install fonts-noto-color-emoji")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("matching") / "bundle"
    build_matching_bundle(out)
    return out


@pytest.fixture(scope="module")
def model(bundle):
    return edgemm.load(bundle, threads=2)


@pytest.fixture(scope="module")
def held_out():
    """The test split's emoji (never trained on) and the committed head's record."""
    pairs = emoji()
    splits = split_rows(len(pairs))
    return [pairs[i] for i in splits["test"]], splits, load_matching_head()[1]


def test_the_committed_head_is_the_studied_winner_and_beats_the_cosine():
    head, record = load_matching_head()
    assert head.config == CONFIG and record["config"] == CONFIG.to_dict()
    assert record["split"] == {"train": 869, "val": 124, "test": 249}
    ours, cosine = record["held_out"], record["cosine_baseline"]
    assert ours["pair_accuracy"] > cosine["pair_accuracy"] + 0.1
    assert ours["rank_all"]["r5"] > cosine["rank_all"]["r5"]
    search = record["search"]
    assert search["mixed_rerank"]["r5"] > search["cosine"]["r5"] and search["cosine_weight"] > 0
    assert 0 < record["threshold"] < 1


def test_the_bundle_records_head_threshold_and_verification(model):
    m = model.manifest
    assert isinstance(model, edgemm.FusionModel) and m.name == "matching" and m.fusion.task == "matching"
    assert m.fusion.inputs == {"image_embedding": "image_encoder/embedding", "image_tokens": "image_encoder/image_tokens",
                               "text_embedding": "text_encoder/embedding"}
    record = load_matching_head()[1]
    assert m.fusion.threshold == pytest.approx(record["threshold"])
    assert m.fusion.rerank_cosine_weight == record["search"]["cosine_weight"]
    assert m.source["fusion_head"]["training"]["held_out"] == record["held_out"]
    assert all(r["passed"] for r in m.verification.values())


def test_the_runtime_reproduces_the_held_out_pair_accuracy(model, held_out):
    """The recorded accuracy comes from PyTorch features; the bundle, run by ONNX Runtime on the same emoji, agrees."""
    test, splits, record = held_out
    names = [PROMPT.format(n) for n, _ in test]
    images = [rgb for _, rgb in test]
    sim = model.embed_images(images, color="rgb") @ model.embed_texts(names).T
    rows = np.arange(len(test))
    img, txt, truth = permutation_pairs(rows, sim, 1, 0, np.random.default_rng(1))  # own name + hardest wrong one
    p = model.match([images[i] for i in img], [names[t] for t in txt], color="rgb")
    accuracy = float(((p >= model.fusion.threshold) == truth).mean())
    assert accuracy == pytest.approx(record["held_out"]["pair_accuracy"], abs=0.03)
    cosine = record["cosine_baseline"]["pair_accuracy"]
    assert accuracy > cosine + 0.1


def test_every_graph_of_a_match_runs_without_spinning_unless_asked(model, bundle, held_out):
    backends = (model.image_backend, model.text_backend, model.fusion_backend)
    assert [spinning_entry(b) for b in backends] == ["0"] * 3  # a match runs all three in a row
    spinning = edgemm.load(bundle, threads=2, spinning=True)
    assert [spinning_entry(b) for b in (spinning.image_backend, spinning.text_backend,
                                        spinning.fusion_backend)] == ["1"] * 3
    (name, rgb), (other, _) = held_out[0][:2]
    texts = [name, other]
    np.testing.assert_allclose(spinning.match(rgb, texts, color="rgb"), model.match(rgb, texts, color="rgb"),
                               atol=1e-6)


def test_match_scores_its_own_name_above_others_more_often_than_not(model, held_out):
    test = held_out[0][:40]
    names = [PROMPT.format(n) for n, _ in test]
    wins = 0
    for i, (_, rgb) in enumerate(test):
        p = model.match(rgb, names, color="rgb")
        wins += int(np.argsort(-p).tolist().index(i) < 5)
    assert wins / len(test) > 0.3  # recall@5 among 40 names; the cosine's is about 0.2, chance 0.125


@pytest.fixture(scope="module")
def indexed(bundle, held_out, tmp_path_factory):
    folder = tmp_path_factory.mktemp("emoji-test")
    for name, rgb in held_out[0][:80]:
        Image.fromarray(rgb).save(folder / f"{name.replace(' ', '_')}.png")
    index = folder.parent / "emoji.idx"
    run_cli("index", "add", index, folder, "--bundle", bundle, "--threads", "2", "-q")
    return index, folder


def test_cli_search_rerank_scores_by_head_and_cosine(model, bundle, indexed):
    index, folder = indexed
    query = PROMPT.format("sunrise over mountains")
    plain = json.loads(run_cli("index", "search", index, "--text", query, "-k", "20", "--bundle", bundle,
                               "--json").stdout)
    reranked = json.loads(run_cli("index", "search", index, "--text", query, "-k", "5", "--rerank", "20",
                                  "--bundle", bundle, "--json").stdout)
    assert len(reranked) == 5 and {h["id"] for h in reranked} <= {h["id"] for h in plain}
    assert all(h["metadata"]["path"].startswith("/") for h in reranked)  # absolute: the reranker re-reads them
    cosine = {h["id"]: h["score"] for h in plain}
    w = model.fusion.rerank_cosine_weight
    for h in reranked:  # the score is head logit + w × cosine
        p = model.match(h["metadata"]["path"], query)
        logit = np.log(p / (1 - p))
        assert h["score"] == pytest.approx(logit + w * cosine[h["id"]], abs=1e-3)
    assert [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)


def test_cli_match_and_its_errors(bundle, default_bundle, indexed, held_out):
    index, folder = indexed
    name = held_out[0][0][0]
    image = folder / f"{name.replace(' ', '_')}.png"
    out = json.loads(run_cli("match", image, PROMPT.format(name), "a photo of a truck", "--bundle", bundle,
                             "--json").stdout)
    assert [m["text"] for m in out["matches"]] == [PROMPT.format(name), "a photo of a truck"]
    assert all(0 <= m["probability"] <= 1 and m["match"] == (m["probability"] >= out["threshold"])
               for m in out["matches"])
    bad = run_cli("match", image, "a dog", "--bundle", default_bundle, check=False)
    assert bad.returncode == 2 and "no image-text matching head" in bad.stderr
    bad = run_cli("index", "search", index, "--image", image, "--rerank", "10", "--bundle", bundle, check=False)
    assert bad.returncode == 2 and "--text" in bad.stderr
