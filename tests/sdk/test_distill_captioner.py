"""edgemm distill CAPTIONER --tower decoder: fewer decoder layers, trained on the teacher's own captions, gated."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import edgemm
from clirun import run_cli
from edgemm._caption_gate import CaptionGateThresholds, caption_gate_images
from edgemm._distill_caption import CaptionDistillGateError, caption_teacher, distill_captioner, training_images
from edgemm.export import distill_caption as dc
from edgemm.export.calibration import _fashion_images
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError

OPEN = CaptionGateThresholds(exact_match=0.0, token_agreement=0.0, mean_similarity=0.0)
FAST = dc.CaptionDistillOptions(epochs=2, batch_size=8, threads=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def images():
    """Unlabelled training images (real photos' crops and Fashion-MNIST training images) and held-out gate images."""
    train = training_images()[0]
    picked = train[:12] + _fashion_images("train", 2000, 12)[0]
    return picked, caption_gate_images(fashion=4, emoji=4)[0][:12]


def _caption_set(path, imgs):
    """(bundle, rebuilt teacher, the teacher's encoder states and the bundle's captions of ``imgs``)."""
    bundle = Bundle(path)
    teacher = caption_teacher(bundle)
    runtime = edgemm.load(path, threads=1)
    with torch.no_grad():
        memory = teacher.image_states(torch.from_numpy(runtime.preprocess(imgs, color="rgb")))
    return bundle, teacher, dc.CaptionSet(memory, [c.token_ids for c in runtime.caption(imgs, color="rgb")])


@pytest.mark.parametrize("kind", ["gpt2", "blip"])
def test_a_decoder_student_keeps_the_chosen_layers(kind, tiny_vit_gpt2_dir, tiny_blip_dir):
    from edgemm.export.models.hf_captioner import CaptionCheckpoint

    ckpt = CaptionCheckpoint(tiny_vit_gpt2_dir if kind == "gpt2" else tiny_blip_dir)
    teacher = ckpt.decoder_lm
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = dc.decoder_student(teacher, [1])
    assert dc.decoder_layers(student) == 1 and dc.decoder_layers(teacher) == 2
    layer = next(iter(dc._resolve(student, dc._layout(student).layers)))
    assert all(m.layer_idx == 0 for m in layer.modules() if hasattr(m, "layer_idx"))
    # the kept layer is the teacher's layer 1, weight for weight; the teacher is unchanged
    kept = dc._resolve(teacher, dc._layout(teacher).layers)[1]
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), kept.state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    trained = dc.trainable(student)
    assert trained and not any("embed" in n or "wte" in n or "wpe" in n for n in trained)
    for bad, needle in ((2, "fewer layers"), ([0, 0], "repeat"), ([1, 0], "increasing"), ([5], "out of range")):
        with pytest.raises(InputError, match=needle):
            dc.decoder_student(teacher, bad)


def test_the_distilled_captioner_is_written_gated_and_smaller(tiny_vit_gpt2_bundle, images, tmp_path):
    train, held = images
    manifest, info = distill_captioner(tiny_vit_gpt2_bundle, tmp_path / "s", student="layers=1", images=train,
                                       options=FAST, thresholds=OPEN, threads=1, gate_images=held)
    assert manifest.source["distilled_from"]["tower"] == "decoder"
    assert manifest.source["distilled_from"]["student"] == {"layers": [1]}
    assert info["student"] == {"layers": 1, "kept": [1], "teacher_layers": 2}
    # the exported student is verified like any export: generation token for token against transformers
    greedy = manifest.verification["generation"]["greedy"]
    assert greedy["identical_tokens"] == greedy["of"] > 0
    d = manifest.verification["distillation"]
    assert d["gate"]["images"] == len(held) + len(train) // 5 and d["passed"]
    assert d["training"]["steps"] > 0 and 0.0 <= d["training"]["held_out_token_agreement"] <= 1.0
    assert d["size_bytes"]["caption_decoder"]["student"] < d["size_bytes"]["caption_decoder"]["teacher"]
    assert d["speed"]["teacher_caption_ms"] > 0 and d["speed"]["student_token_ms"] > 0
    model = edgemm.load(tmp_path / "s", threads=1)  # an ordinary, hash-checked captioner bundle
    assert len([t for t in model.decoder_backend.inputs if t.name.startswith("past_key")]) == 1
    assert all(len(c.token_ids) > 1 for c in model.caption(held[:2], color="rgb"))
    assert not (tmp_path / "s.distill").exists()  # the checkpoint goes once the bundle is written
    with pytest.raises(BundleError, match="already a distilled student"):
        distill_captioner(tmp_path / "s", tmp_path / "again", images=train, options=FAST, thresholds=OPEN)


def test_a_failed_gate_writes_nothing_and_names_the_figure(tiny_blip_bundle, images, tmp_path):
    train, held = images
    strict = CaptionGateThresholds(exact_match=1.0, token_agreement=1.0, mean_similarity=0.0)
    with pytest.raises(CaptionDistillGateError, match="exact caption match .* < 100%") as e:
        distill_captioner(tiny_blip_bundle, tmp_path / "s", images=train, thresholds=strict, threads=1,
                          options=dc.CaptionDistillOptions(max_steps=1, batch_size=8, threads=1), gate_images=held)
    assert not (tmp_path / "s").exists()
    assert (tmp_path / "s.distill" / "checkpoint.pt").is_file()  # kept to resume or retrain
    assert e.value.report["gate"]["exact_match"] < 1.0 and "kept" in e.value.report["student"]


def test_an_interrupted_run_resumes_to_the_same_student(tiny_vit_gpt2_bundle, images, tmp_path):
    bundle, teacher, data = _caption_set(tiny_vit_gpt2_bundle, images[0])
    tr, ho = dc.split_captions(data, 0.2)
    g = bundle.manifest.generation
    kw = dict(pad_id=g.pad_id, prompt_length=len(g.start_ids), options=FAST)

    whole, report = dc.distill_decoder(teacher.lm, dc.decoder_student(teacher.lm, 1), tr, ho, **kw)

    def stop(epoch, step, total, metrics):
        if step == 3 and "loss" in metrics:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dc.distill_decoder(teacher.lm, dc.decoder_student(teacher.lm, 1), tr, ho, checkpoint_dir=tmp_path, progress=stop,
                           **kw)
    resumed, again = dc.distill_decoder(teacher.lm, dc.decoder_student(teacher.lm, 1), tr, ho, checkpoint_dir=tmp_path,
                                        resume=True, **kw)
    assert again.resumed_from_step == 2 and again.steps == report.steps  # the step-2 checkpoint, then the rest
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert report.held_out_token_agreement == again.held_out_token_agreement
    with pytest.raises(InputError, match="training options differ"):
        dc.distill_decoder(teacher.lm, dc.decoder_student(teacher.lm, 1), tr, ho, checkpoint_dir=tmp_path, resume=True,
                           **{**kw, "options": dc.CaptionDistillOptions(epochs=3, batch_size=8, threads=1)})


def test_training_follows_the_teacher(tiny_vit_gpt2_bundle, images):
    """The loss is real: a few epochs raise the held-out token agreement of a 1-layer student of random weights."""
    bundle, teacher, data = _caption_set(tiny_vit_gpt2_bundle, images[0] * 2)
    g = bundle.manifest.generation
    _, report = dc.distill_decoder(teacher.lm, dc.decoder_student(teacher.lm, 1), data, data.subset(np.arange(8)),
                                   pad_id=g.pad_id, prompt_length=len(g.start_ids),
                                   options=dc.CaptionDistillOptions(epochs=8, batch_size=8, lr=3e-3, threads=1,
                                                                    patience=0))
    assert report.held_out_token_agreement > report.initial_token_agreement + 0.1


def test_what_cannot_be_distilled_is_refused(tiny_blip_vqa_bundle, tiny_vit_gpt2_bundle, images, tmp_path):
    with pytest.raises(BundleError, match="answers questions"):
        distill_captioner(tiny_blip_vqa_bundle, tmp_path / "v", images=images[0])
    moved = tmp_path / "moved"
    shutil.copytree(tiny_vit_gpt2_bundle, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a folder here"):
        distill_captioner(Bundle(moved, check_hashes=False).path, tmp_path / "m", images=images[0])
    with pytest.raises(InputError, match="layers=N"):
        distill_captioner(tiny_vit_gpt2_bundle, tmp_path / "x", student="ffn=3", images=images[0])
    with pytest.raises(InputError, match="at least 10"):
        distill_captioner(tiny_vit_gpt2_bundle, tmp_path / "y", images=images[0][:5])
    assert not any((tmp_path / n).exists() for n in ("v", "m", "x", "y"))


def test_cli_distils_a_captioner_decoder(tiny_blip_bundle, images, tmp_path):
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, im in enumerate(images[0]):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    out = tmp_path / "student"
    r = run_cli("distill", str(tiny_blip_bundle), "--tower", "decoder", "--data", str(folder), "--epochs", "1",
                "--batch-size", "8", "--threads", "1", "--min-exact-match", "0", "--min-token-agreement", "0",
                "--min-similarity", "0", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "1 of the teacher's 2 decoder layers" in r.stdout and "per token" in r.stdout and "PASSED" in r.stdout
    info = run_cli("info", str(out))
    assert "distilled: decoder student keeping layers [1] of 2" in info.stdout
    r = run_cli("distill", str(tiny_blip_bundle), "--tower", "image", "-o", str(tmp_path / "no"), check=False)
    assert r.returncode != 0 and "use --tower decoder" in r.stderr


def test_the_built_in_teacher_is_checked_and_makes_pseudo_images(default_captioner_bundle, images):
    """The built-in captioner is rebuilt from packaged weights and checked token for token against its bundle
    (captioning the photos' encoder states directly included); its pseudo images are seeded."""
    from edgemm._distill_caption import _check_teacher, runtime_captions

    bundle = Bundle(default_captioner_bundle)
    teacher = caption_teacher(bundle)
    runtime = edgemm.load(default_captioner_bundle, threads=1)
    assert _check_teacher(teacher, runtime) == {"photos": 4, "same_tokens": True}
    states = teacher.synthetic(6, images[0])
    assert states.shape[0] == 6 and states.shape[1:] == teacher.image_states(
        torch.from_numpy(runtime.preprocess(images[1][:1], color="rgb"))).shape[1:]
    tokens = runtime_captions(runtime, teacher.parts(teacher.lm).decoder, states)
    g = bundle.manifest.generation
    assert all(t[: len(g.start_ids)] == list(g.start_ids) and len(t) > len(g.start_ids) + 1 for t in tokens)
    assert len({tuple(t) for t in tokens}) > 1  # different classes, different captions
    assert teacher.synthetic(6, images[0]).equal(states)  # seeded: a resumed run trains on the same inputs
