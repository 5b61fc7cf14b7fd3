"""edgemm distill end to end on a real (tiny) CLIP checkpoint: teacher rebuilt, student trained, exported, gated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edgemm
from clirun import run_cli
from edgemm._distill import DistillGateError, DistillThresholds, distill_bundle
from edgemm.export.distill import DistillOptions, default_text_corpus
from edgemm.runtime.datasets import EMOJI_FONT
from edgemm.runtime.errors import BundleError, InputError

EMOJI = 100 if EMOJI_FONT.is_file() else 0  # the gate's emoji, in name sets with the truth

FAST = DistillOptions(max_steps=6, batch_size=32, checkpoint_every=1, threads=2)
OPEN = DistillThresholds(mean_cosine=-1.0, retention=0.0, top1_agreement=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    path.write_text("\n".join(default_text_corpus().texts[:400]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def student(tiny_clip_bundle, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "tiny-student"
    manifest, info = distill_bundle(tiny_clip_bundle, out, student="layers=1", data=corpus, options=FAST,
                                    thresholds=OPEN, eval_images=40, threads=2)
    return out, manifest, info


def test_the_student_is_an_ordinary_bundle_with_its_report(student, tiny_clip_bundle):
    out, manifest, info = student
    teacher = edgemm.load(tiny_clip_bundle, threads=1)
    model = edgemm.load(out, threads=1)  # hashes checked: a complete bundle
    assert model.manifest.source["distilled_from"]["student"] == {"layers": 1, "ffn": None}
    assert manifest.verification["text_encoder"]["passed"]  # the student graph matches its PyTorch module
    assert info["student_parameters"] < info["teacher_parameters"]
    assert info["training"]["steps"] == 6 and info["data"]["train"] + info["data"]["held_out"] == 400
    assert info["training"]["held_out_mean_cosine"] > info["training"]["initial_mean_cosine"]
    assert info["speed"]["student_ms"] > 0 and info["retention"]["images"] == 40 + 7 + EMOJI
    assert manifest.verification["distillation"]["gate"]["image_cosine"]["mean"] == pytest.approx(1.0)
    assert 0.0 <= info["gate"]["top1_agreement"] <= 1.0 and "imagenet names" in info["gate"]["agreement_by_kind"]
    assert (out / "image_encoder.onnx").read_bytes() == (Path(tiny_clip_bundle) / "image_encoder.onnx").read_bytes()
    texts = ["a photo of a cat.", "a red car"]
    cos = (teacher.embed_texts(texts) * model.embed_texts(texts)).sum(1)
    assert cos.shape == (2,) and (abs(cos) <= 1.0001).all()
    assert not out.with_name(out.name + ".distill").exists()  # the checkpoint is removed once written
    shown = run_cli("info", out).stdout
    assert f"distilled: text student layers=1 of {info['teacher']}; gate passed: text cosine" in shown
    assert f"{info['speed']['speedup']:.2f}x at batch {info['speed']['batch']}" in shown


def test_bench_has_no_pytorch_reference_for_the_distilled_tower_only(student, tmp_path):
    out, _, _ = student
    run_cli("bench", out, "--batch", "1", "--report", tmp_path / "bench", "--threads", "1", "--warmup", "1",
            "--min-time", "0.05", "--min-iters", "3", "-q")
    rows = {r["task"]: r for r in json.loads((tmp_path / "bench" / "report.json").read_text())["results"]}
    assert rows["text"]["reference"] is None and "distilled student" in rows["text"]["reference_unavailable"]
    assert rows["image"]["reference_unavailable"] is None  # the teacher's own image tower, measured
    assert rows["image"]["reference"]["embedding_cosine_min"] > 0.9999
    assert "distilled student" in (tmp_path / "bench" / "report.md").read_text()


def test_a_distilled_tower_is_not_distilled_again(student, tmp_path):
    out, _, _ = student
    with pytest.raises(BundleError, match="text tower .* is already a distilled student"):
        distill_bundle(out, tmp_path / "again", tower="text", options=FAST)
    assert not (tmp_path / "again").exists()


def test_an_interrupted_run_writes_nothing_and_resumes(tiny_clip_bundle, corpus, tmp_path):
    out = tmp_path / "student"

    def stop_at_step_3(stage, done, total, metrics):
        if stage == "train" and done == 3 and "loss" in metrics:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_bundle(tiny_clip_bundle, out, student="layers=1", data=corpus, options=FAST, thresholds=OPEN,
                       eval_images=10, progress=stop_at_step_3)
    assert not out.exists() and (tmp_path / "student.distill" / "checkpoint.pt").is_file()
    _, info = distill_bundle(tiny_clip_bundle, out, student="layers=1", data=corpus, options=FAST, thresholds=OPEN,
                             eval_images=10)
    assert info["training"]["resumed_from_step"] == 3 and info["training"]["steps"] == 6
    assert (out / "manifest.json").is_file() and not (tmp_path / "student.distill").exists()


def test_a_student_below_the_gate_is_not_written(tiny_clip_bundle, corpus, tmp_path):
    out = tmp_path / "student"
    strict = DistillThresholds(mean_cosine=0.999, top1_agreement=0.999)
    with pytest.raises(DistillGateError, match=r"mean cosine.*top-1 agreement with the teacher \d+\.\d% < 100% over "
                                               r"\d+ held-out decisions \(lowest: ") as failed:
        distill_bundle(tiny_clip_bundle, out, student="layers=1", data=corpus, options=FAST,
                       thresholds=strict, eval_images=10)
    assert not out.exists() and failed.value.report["passed"] is False
    assert (tmp_path / "student.distill" / "checkpoint.pt").is_file()  # kept, to resume or accept
    _, info = distill_bundle(tiny_clip_bundle, out, student="layers=1", data=corpus, options=FAST,
                             thresholds=DistillThresholds(mean_cosine=0.999), accept_degradation=True, eval_images=10)
    assert info["accepted_degradation"] and info["training"]["resumed_from_step"] == 6
    assert edgemm.load(out).manifest.verification["distillation"]["passed"] is False


def _edited_copy(bundle: Path, dst: Path, **changes) -> Path:
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "source_path":
            manifest["source"]["path"] = value
        else:
            manifest[key] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_bundles_that_cannot_be_distilled(tiny_clip_bundle, corpus, tmp_path):
    gone = _edited_copy(tiny_clip_bundle, tmp_path / "gone", source_path=str(tmp_path / "moved-away"))
    with pytest.raises(BundleError, match="not there any more"):
        distill_bundle(gone, tmp_path / "a", data=corpus, options=FAST)
    int8 = _edited_copy(tiny_clip_bundle, tmp_path / "int8", precision="int8")
    with pytest.raises(BundleError, match="distil the fp32 bundle"):
        distill_bundle(int8, tmp_path / "b", data=corpus, options=FAST)
    from tiny_checkpoints import make_tiny_clip

    other = make_tiny_clip(tmp_path / "other-clip", seed=1)
    swapped = _edited_copy(tiny_clip_bundle, tmp_path / "swapped", source_path=str(other))
    with pytest.raises(BundleError, match="does not reproduce"):
        distill_bundle(swapped, tmp_path / "c", data=corpus, options=FAST)
    with pytest.raises(InputError, match="layers"):
        distill_bundle(tiny_clip_bundle, tmp_path / "d", student="layers=2", data=corpus, options=FAST)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="no text"):
        distill_bundle(tiny_clip_bundle, tmp_path / "e", data=tmp_path / "empty.txt", options=FAST)
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_cli_distill_errors_are_one_line(tiny_clip_bundle, tmp_path):
    out = run_cli("distill", tiny_clip_bundle, "--student", "layers=9", "-o", tmp_path / "s", check=False)
    assert out.returncode == 2 and "layers" in out.stderr and not (tmp_path / "s").exists()
    out = run_cli("distill", tiny_clip_bundle, "--data", tmp_path / "nope.txt", "-o", tmp_path / "s", check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """A folder of unlabelled images, as a camera would leave them."""
    from PIL import Image

    from edgemm.runtime.datasets import emoji

    folder = tmp_path_factory.mktemp("frames")
    for i, (_, rgb) in enumerate(emoji()[:10]):
        Image.fromarray(rgb).save(folder / f"frame{i:02d}.png")
    return folder


def test_image_students_that_cannot_be_made(tiny_clip_bundle, frames, tmp_path):
    with pytest.raises(InputError, match="not smaller than its teacher"):  # Lite0 outweighs a 32-px toy ViT
        distill_bundle(tiny_clip_bundle, tmp_path / "a", tower="image", student="size=32,depth=1", data=frames,
                       options=FAST)
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(frames.iterdir())[:3]:
        shutil.copy(p, few / p.name)
    with pytest.raises(InputError, match="at least 5"):
        distill_bundle(tiny_clip_bundle, tmp_path / "b", tower="image", data=few, options=FAST)
    with pytest.raises(InputError, match="preset"):
        distill_bundle(tiny_clip_bundle, tmp_path / "c", tower="image", student="resnet50", data=frames, options=FAST)
    with pytest.raises(InputError, match="choose from"):
        distill_bundle(tiny_clip_bundle, tmp_path / "d", tower="audio", options=FAST)
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_a_default_image_tower_that_changed_since_export_is_refused(default_bundle, frames, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(default_bundle, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["source"]["join"]["temperature"] = 1.0  # not the temperature the graph was exported with
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not reproduce the bundle's image graph"):
        distill_bundle(changed, tmp_path / "s", tower="image", data=frames, options=FAST)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_cli_distils_the_default_image_tower_into_a_smaller_input(default_bundle, frames, tmp_path):
    out = tmp_path / "small-image"
    result = run_cli("distill", default_bundle, "--tower", "image", "--student", "size=128,depth=2",
                     "--data", frames, "--max-steps", "2", "--accept-degradation", "--threads", "2", "--json",
                     "-o", out)
    info = json.loads(result.stdout)
    assert info["tower"] == "image" and info["training"]["unit"] == "images" and info["training"]["steps"] == 2
    assert info["student_gflops"] < 0.5 * info["teacher_gflops"]
    assert info["speed"]["pixels"] == [224, 128] and info["speed"]["student_ms"] > 0
    model = edgemm.load(out, threads=1)  # an ordinary bundle: hashes, preprocessing and graphs agree
    assert model.manifest.image.size == 128 and model.manifest.graphs["image_encoder"].inputs[0].shape[2:] == [128, 128]
    assert (out / "text_encoder.onnx").read_bytes() == (Path(default_bundle) / "text_encoder.onnx").read_bytes()
    from edgemm.runtime.datasets import sample_photos

    cat = next(p.image for p in sample_photos() if p.label == "cat")
    assert model.classify(cat, labels=["cat", "rocket", "cup of coffee"], color="rgb")[0].label == "cat"
    gate = info["gate"]
    mine = next(e for e in gate["label_sets"] if e["kind"] == "your labels")  # the folder's held-out frames
    assert mine["labels"] == "bundle's own" and mine["images"] > 0


@pytest.mark.slow
def test_a_checkpoint_teacher_gets_a_conv_student_with_a_projection(tmp_path, frames):
    from edgemm.export.models.clip import build_clip_bundle
    from tiny_checkpoints import make_tiny_clip

    teacher = build_clip_bundle(make_tiny_clip(tmp_path / "clip", preset="bench"), tmp_path / "clip-bundle")
    assert teacher.image.size == 224
    out = tmp_path / "student"
    _, info = distill_bundle(tmp_path / "clip-bundle", out, tower="image", student="size=96,depth=1", data=frames,
                             options=DistillOptions(max_steps=2, batch_size=16, lr=1e-4, threads=2), thresholds=OPEN,
                             eval_images=20, threads=2)
    model = edgemm.load(out, threads=1)
    assert model.manifest.image.size == 96 and model.manifest.image.mean == [127.0] * 3  # the student's own inputs
    assert model.embed_images([frames / "frame00.png"]).shape == (1, 256)
    assert info["training"]["initial_mean_cosine"] > 0.0 and info["student_gflops"] < info["teacher_gflops"]
