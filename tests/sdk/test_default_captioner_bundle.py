"""The built-in captioner as users get it: verified export, golden captions, load(default=...), CLI, eval."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import edgemm
from edgemm.runtime.datasets import sample_photos

from clirun import run_cli

GOLDEN = Path(__file__).parents[1] / "data" / "golden_captioner.json"


@pytest.fixture(scope="module")
def captioner(default_captioner_bundle):
    return edgemm.load(default_captioner_bundle, threads=2)


def test_export_is_verified_token_for_token(captioner):
    m = captioner.manifest
    assert m.family == "captioner" and m.source["kind"] == "default-captioner"
    v = m.verification["generation"]
    assert v["greedy"]["identical_tokens"] == v["beam"]["identical_tokens"] == v["images"] == 15
    assert v["logits"]["max_abs_diff"]["cached_steps"] < v["logits"]["tolerance"]
    assert m.generation.start_ids == [50257, 50362] and m.generation.eos_ids == [50256]
    assert not m.generation.prompt


def test_golden_captions_of_the_sample_photos(captioner):
    """What the shipped weights say about the sample photos; a change here is a change users see."""
    golden = json.loads(GOLDEN.read_text())
    photos = sample_photos()
    got = {p.name: c.text for p, c in zip(photos, captioner.caption([p.image for p in photos], color="rgb"))}
    assert got == golden["captions"]


def test_imagenet_like_subjects_are_named(captioner):
    golden = json.loads(GOLDEN.read_text())
    for name in golden["named"]:
        photo = next(p for p in sample_photos() if p.name == name)
        assert any(w in captioner.caption(photo.image, color="rgb").text.lower() for w in golden["named"][name])


def test_load_default_and_cli(default_captioner_bundle, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "bundles").mkdir(parents=True)
    os.symlink(default_captioner_bundle, home / "bundles" / "captioner")  # what load() would have built
    monkeypatch.setenv("EDGEMM_HOME", str(home))
    model = edgemm.load(default="captioner", threads=1)
    assert isinstance(model, edgemm.Captioner)
    from PIL import Image

    Image.fromarray(sample_photos()[1].image).save(tmp_path / "cat.png")
    out = run_cli("caption", str(tmp_path / "cat.png"), "--json")
    assert json.loads(out.stdout)[0]["caption"] == model.caption(str(tmp_path / "cat.png")).text
    assert "cat" in json.loads(out.stdout)[0]["caption"].lower()


def test_eval_captioner_reports_every_source(captioner):
    from edgemm._caption_eval import eval_captioner

    report = eval_captioner(captioner, fashion_limit=40)
    scores = report["scores"]
    assert {"emoji", "fashion_mnist", "photos", "overall", "macro"} <= set(scores)
    assert scores["fashion_mnist"]["n"] == 40 and scores["photos"]["n"] == 15
    assert 0 < scores["overall"]["bleu1"] <= 1 and scores["overall"]["cider_d"] > 0
    assert len(report["photos"]) == 15
