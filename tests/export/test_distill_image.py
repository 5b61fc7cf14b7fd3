"""Image students on the real EfficientNet-Lite0 weights: building, data, views, losses, training and resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgemm.export.distill import DistillOptions
from edgemm.export.distill_image import (
    LITE_IMAGE,
    ConvEmbeddingTower,
    ImageSet,
    ImageStudentSpec,
    ImageTeacher,
    conv_student,
    count_flops,
    default_image_data,
    distill_image,
    draw_views,
    lite_student,
    list_image_students,
    logit_kd_loss,
    parse_image_student_spec,
    read_image_folder,
    split_images,
)
from edgemm.export.models.efficientnet_lite import efficientnet_lite0
from edgemm.runtime.datasets import emoji, sample_photos
from edgemm.runtime.errors import InputError
from edgemm.runtime.image import ImagePreprocessor

SMALL = replace(LITE_IMAGE, size=64)  # a quick teacher input size for training tests


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return [rgb for _, rgb in emoji()[:16]] + [p.image for p in sample_photos()[:4]]


def test_presets_parse_and_key_values_are_checked():
    assert {"lite0-160", "lite0-128"} <= set(list_image_students())
    assert parse_image_student_spec("lite0-160") == ImageStudentSpec(size=160)
    assert parse_image_student_spec("size=128, depth=2, expand=0.5") == ImageStudentSpec(128, 2, 0.5)
    for bad, words in (("size=160,width=2", "expected"), ("depth=2", "size=S"), ("size=big", "integers"),
                       ("size=160,size=128", "repeated"), ("size=16", "32 to 1024"), ("size=160,expand=1.5", "(0, 1)"),
                       ("size=160,depth=0", "1 or more"), ("mobilevit", "preset")):
        with pytest.raises(InputError, match=words):
            parse_image_student_spec(bad)


def test_a_same_size_student_is_the_teacher_and_the_teacher_is_left_alone(lite0):
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    x = torch.from_numpy(ImagePreprocessor(LITE_IMAGE)([p.image for p in sample_photos()[:3]], color="rgb"))
    with torch.no_grad():
        assert torch.equal(lite_student(lite0, ImageStudentSpec(224))(x), lite0(x))
        narrow = lite_student(lite0, ImageStudentSpec(224, depth=1, expand=0.5))
        assert narrow(x).shape == (3, 1000)
    assert all(torch.equal(before[k], v) for k, v in lite0.state_dict().items())
    assert len(narrow._blocks) == 7  # one block per stage
    hidden = [b._depthwise_conv.out_channels for b in narrow._blocks if b.has_expand]
    assert all(h % 8 == 0 for h in hidden) and hidden[0] == 48  # 96 expanded channels of stage 2, halved


def test_smaller_students_cost_fewer_flops_in_proportion(lite0):
    teacher = count_flops(lite0, 224)
    at_160 = count_flops(lite_student(lite0, ImageStudentSpec(160)), 160)
    assert at_160 / teacher == pytest.approx((160 / 224) ** 2, rel=0.06)
    assert count_flops(lite_student(lite0, ImageStudentSpec(160, expand=0.75)), 160) < at_160


def test_a_folder_gives_each_file_views_and_the_split_keeps_them_apart(tmp_path, pictures):
    for i, rgb in enumerate(pictures[:10]):
        Image.fromarray(rgb).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = read_image_folder(tmp_path, target_views=40)
    assert len(data) == 10 and data.views == [4] * 10
    train, held = split_images(data, 0.2, seed=0)
    assert len(held) == 2 and not set(map(str, train.images)) & set(map(str, held.images))
    assert split_images(data, 0.2, seed=0)[1].images == held.images  # deterministic for a seed


def test_bad_image_data_says_what_to_do(tmp_path, pictures):
    with pytest.raises(InputError, match="not a folder"):
        read_image_folder(tmp_path / "missing")
    for i, rgb in enumerate(pictures[:3]):
        Image.fromarray(rgb).save(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match="holds 3 image file"):
        read_image_folder(tmp_path)
    with pytest.raises(InputError, match="too few to hold"):
        split_images(ImageSet(pictures[:5], [0, 0, 0, 1, 1], [1] * 5, "five"), 0.1)


def test_the_packaged_images_avoid_what_the_gate_measures():
    data = default_image_data(fashion=50)
    gate_photos = {p.image.tobytes() for p in sample_photos()}
    assert not any(isinstance(im, np.ndarray) and im.tobytes() in gate_photos for im in data.images)
    assert "Fashion-MNIST training" in data.source and len(data) >= 50


def test_views_are_the_runtimes_pixels_and_the_teachers_outputs(lite0, pictures):
    teacher = ImageTeacher.of_module(lite_student(lite0, ImageStudentSpec(64)), SMALL, kind="logits", temperature=3.0)
    data = ImageSet(pictures[:3], [0, 1, 2], [3, 1, 2], "pictures")
    student = replace(LITE_IMAGE, size=48)
    views, targets = draw_views(data, student, teacher, seed=5)
    assert views.shape == (6, 48, 48, 3) and targets.shape == (6, 1000)
    assert np.array_equal(views[0], ImagePreprocessor(student).resize(pictures[0]))  # first view: the whole image
    whole = teacher.outputs(ImagePreprocessor(SMALL)(pictures[:1], color="rgb"))
    assert np.allclose(targets[0].numpy(), whole[0], atol=1e-4)  # batch of 6 vs 1: float noise only
    again, _ = draw_views(data, student, teacher, seed=5)
    other, _ = draw_views(data, student, teacher, seed=6)
    assert np.array_equal(views, again) and not np.array_equal(views, other)


def test_logit_distillation_is_zero_only_at_the_teacher():
    t = torch.randn(4, 10)
    assert float(logit_kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_kd_loss(t + torch.randn(4, 10), t, 3.0)) > 0.01
    assert float(logit_kd_loss(t + 5.0, t, 3.0)) == pytest.approx(0.0, abs=1e-5)  # softmax ignores a shift


def _tiny_run(lite0, pictures, tmp_path=None, resume=False, progress=None, steps=6):
    teacher = ImageTeacher.of_module(lite_student(lite0, ImageStudentSpec(64)), SMALL, kind="logits", temperature=3.0)
    student = lite_student(lite0, ImageStudentSpec(48, depth=1))
    train = ImageSet(pictures[:12], list(range(12)), [2] * 12, "emoji")
    held = ImageSet(pictures[12:16], list(range(4)), [2] * 4, "emoji")
    options = DistillOptions(epochs=3, max_steps=steps, batch_size=8, lr=3e-4, checkpoint_every=1, threads=1)
    return distill_image(teacher, student, replace(LITE_IMAGE, size=48), train, held, options,
                         checkpoint_dir=tmp_path, resume=resume, progress=progress)


def test_training_brings_a_lite_student_closer_and_resumes_to_the_same_weights(lite0, pictures, tmp_path):
    student, report = _tiny_run(lite0, pictures, steps=6)
    assert report.unit == "images" and report.train_items == 24 and report.held_out_items == 8
    assert report.history[-1]["held_out_loss"] < report.history[0]["held_out_loss"]

    def stop(epoch, done, total, metrics):
        if done == 4 and "loss" in metrics:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_run(lite0, pictures, tmp_path, progress=stop)
    resumed, again = _tiny_run(lite0, pictures, tmp_path, resume=True)
    assert again.resumed_from_step == 4
    for (name, a), (_, b) in zip(student.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_an_embedding_teacher_gets_a_projected_conv_student_fitted_by_least_squares(lite0, pictures):
    class Embedder(torch.nn.Module):  # a fixed "checkpoint" teacher: Lite0 features to 16 dims
        def __init__(self):
            super().__init__()
            self.net = lite_student(lite0, ImageStudentSpec(64))
            self.proj = torch.nn.Linear(1000, 16)

        def forward(self, pixels):
            return torch.nn.functional.normalize(self.proj(self.net(pixels)), dim=-1)

    torch.manual_seed(0)
    teacher = ImageTeacher.of_module(Embedder(), SMALL, kind="embedding")
    student = conv_student(ImageStudentSpec(48, depth=1), 16)
    assert isinstance(student, ConvEmbeddingTower)
    train = ImageSet(pictures[:12], list(range(12)), [3] * 12, "emoji")
    held = ImageSet(pictures[12:16], list(range(4)), [2] * 4, "emoji")
    options = DistillOptions(epochs=1, max_steps=2, batch_size=12, lr=1e-4, threads=1)
    student, report = distill_image(teacher, student, replace(LITE_IMAGE, size=48), train, held, options)
    assert report.initial_mean_cosine > 0.5  # the least-squares read-out already points the right way
    assert student(torch.zeros(1, 3, 48, 48)).shape == (1, 16)

    # the text students' loss terms apply: the in-batch similarity KL adds to the same untrained student's loss
    _, weighted = distill_image(teacher, conv_student(ImageStudentSpec(48, depth=1), 16), replace(LITE_IMAGE, size=48),
                                train, held, replace(options, max_steps=1, similarity_weight=1.0))
    before, with_kl = report.history[0], weighted.history[0]
    assert with_kl["held_out_mean_cosine"] == pytest.approx(before["held_out_mean_cosine"], abs=1e-5)
    assert with_kl["held_out_loss"] > before["held_out_loss"] + 1e-4
