"""Distilling an image tower into a smaller convolutional student that embeds into the same space.

The image counterpart of ``edgemm.export.distill`` (whose training loop,
options, checkpoints and report it shares):

1. Students (``lite_student``, ``conv_student``): EfficientNet-Lite0 at a lower
   input size, with fewer blocks per stage and narrower inverted bottlenecks,
   initialised from the teacher when the teacher is EfficientNet-Lite (the
   default model) and from the ImageNet weights plus a least-squares
   projection into the teacher's space otherwise (a CLIP/SigLIP checkpoint).
   Plain convolutions, ReLU6 and no squeeze-excite, so they build well with
   TensorRT and int8. Measured presets live in ``models/data/image_students.json``.
2. Data: a folder of the user's unlabelled images, or packaged images that the
   evaluation never uses (Fashion-MNIST *training* images, even-numbered emoji,
   scikit-image/matplotlib pictures outside the sample photos, LFW faces);
   a held-out split by whole source image; a fixed set of random crops and
   flips ("views"), each rendered by the runtime's own preprocessing at the
   teacher's and the student's input size.
3. Losses: for a classifier teacher (the default model) the softened class
   distribution at the tower's own temperature (Hinton et al. 2015), which is
   what its embedding and class scores are made of; for an embedding teacher
   the text students' embedding losses: 1 − cosine in the shared space, plus
   MSE and in-batch similarity KL when the options weigh them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.distill import (
    DistillOptions,
    DistillReport,
    Progress,
    _hash_module,
    _loss,
    _start,
    _Task,
    _threads,
    held_out_mask,
    load_presets,
    train,
)
from edgemm.export.models.efficientnet_lite import EfficientNetLite, MBConv, efficientnet_lite0
from edgemm.runtime.errors import InputError
from edgemm.runtime.image import IMAGE_SUFFIXES, ImagePreprocessor, to_rgb
from edgemm.runtime.manifest import ImagePreprocess

DEFAULT_IMAGE_STUDENT = "lite0-160"  # see image_students.json for the measurements behind it
MAX_VIEWS = 6000  # most training views kept in memory (uint8 at the student's size)
TARGET_VIEWS = 4000  # views drawn from a user's folder when it holds fewer images than this
TEACHER_CHUNK = 32  # images per teacher forward pass when precomputing targets
MIN_IMAGES = 5  # a folder needs this many images to train on some and hold some out
LITE_IMAGE = ImagePreprocess(size=224, crop_fraction=0.875, mean=[127.0] * 3, std=[128.0] * 3)


# ----------------------------------------------------------------------------------------------- students


@dataclass(frozen=True)
class ImageStudentSpec:
    """Which image student to build (see ``lite_student`` and ``conv_student``)."""

    size: int  # square input side in pixels
    depth: int | None = None  # most blocks kept per stage (the first ones); None keeps all
    expand: float | None = None  # share of each block's expanded channels kept, in (0, 1); None keeps all

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 32 <= self.size <= 1024:
            raise InputError(f"image student size must be a side in pixels from 32 to 1024, got {self.size!r}.")
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, int)
                                       or self.depth < 1):
            raise InputError(f"image student depth is the most blocks kept per stage (1 or more), got {self.depth!r}.")
        if self.expand is not None and not 0.0 < float(self.expand) < 1.0:
            raise InputError(f"image student expand is the share of expanded channels kept, in (0, 1), got "
                             f"{self.expand!r}; leave it out to keep them all.")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "depth": self.depth, "expand": self.expand}


def _presets() -> dict[str, dict[str, Any]]:
    return load_presets("image_students.json")


def list_image_students() -> list[str]:
    """Names of the measured image student presets (``export/models/data/image_students.json``)."""
    return sorted(_presets())


def parse_image_student_spec(text: str) -> ImageStudentSpec:
    """An image student from a preset name or ``size=S[,depth=D][,expand=F]``.

    Raises:
        InputError: An unknown preset or key, a repeated key, or a bad value.
    """
    presets = _presets()
    if text in presets:
        p = presets[text]
        return ImageStudentSpec(size=p["size"], depth=p.get("depth"), expand=p.get("expand"))
    values: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in ("size", "depth", "expand") or key in values:
            raise InputError(f"image student {text!r}: {'repeated key ' + repr(key) if key in values else 'expected'} "
                             f"a preset ({', '.join(sorted(presets))}) or size=S[,depth=D][,expand=F], e.g. "
                             "size=160,expand=0.75.")
        values[key] = value
    if "size" not in values:
        raise InputError(f"image student {text!r} does not give its input size; add size=S (e.g. size=160).")
    try:
        return ImageStudentSpec(size=int(values["size"]),
                                depth=int(values["depth"]) if "depth" in values else None,
                                expand=float(values["expand"]) if "expand" in values else None)
    except ValueError as e:
        raise InputError(f"image student {text!r}: size and depth are integers, expand a fraction ({e}).") from None


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name)[idx])
    return new


def _narrow(block: MBConv, share: float) -> None:
    """Keep ``share`` of an expanding block's hidden channels: those whose depthwise output matters most.

    A hidden channel's importance is |BN scale after the depthwise conv| × the L2
    norm of its column in the projection, the conv analogue of the text
    students' feed-forward pruning.
    """
    hidden = block._depthwise_conv.out_channels
    keep = max(8, int(round(hidden * share / 8)) * 8)  # multiples of 8 suit vector units and TensorRT
    if not block.has_expand or keep >= hidden:
        return
    score = block._bn1.weight.detach().abs() * block._project_conv.weight.detach().flatten(1).norm(dim=0)
    idx = score.topk(keep).indices.sort().values
    with torch.no_grad():
        expand, depthwise, project = block._expand_conv, block._depthwise_conv, block._project_conv
        expand.weight = nn.Parameter(expand.weight[idx].clone())
        expand.out_channels = keep
        depthwise.weight = nn.Parameter(depthwise.weight[idx].clone())
        depthwise.in_channels = depthwise.out_channels = depthwise.groups = keep
        project.weight = nn.Parameter(project.weight[:, idx].clone())
        project.in_channels = keep
    block._bn0, block._bn1 = _slice_bn(block._bn0, idx), _slice_bn(block._bn1, idx)


def lite_student(teacher: EfficientNetLite, spec: ImageStudentSpec) -> EfficientNetLite:
    """A smaller EfficientNet-Lite initialised from ``teacher``'s weights (the teacher is not changed).

    Lower input size changes no weight, only the TensorFlow SAME padding, which
    is recomputed for the new size. ``depth`` keeps each stage's first blocks:
    the later ones are residual (same shape in and out), so dropping them keeps
    the net whole. ``expand`` narrows every inverted bottleneck (``_narrow``).
    """
    student = EfficientNetLite(image_size=spec.size, num_classes=teacher._fc.out_features)
    student.load_state_dict(teacher.state_dict())
    if spec.depth is not None:
        kept, previous_out = [], None
        run = 0
        for block in student._blocks:
            out = block._bn2.num_features
            run = run + 1 if block.residual and out == previous_out else 1
            previous_out = out
            if run <= spec.depth:
                kept.append(block)
        student._blocks = nn.ModuleList(kept)
    if spec.expand is not None:
        for block in student._blocks:
            _narrow(block, spec.expand)
    return student.eval()


class ConvEmbeddingTower(nn.Module):
    """A convolutional backbone's pooled features, projected and normalised: a student for an embedding teacher.

    Args:
        backbone: EfficientNet-Lite (its classifier head is not used).
        dim: Embedding size of the teacher.
    """

    def __init__(self, backbone: EfficientNetLite, dim: int):
        super().__init__()
        backbone._fc = nn.Identity()  # the ImageNet classifier is not part of the student
        self.backbone = backbone
        self.projection = nn.Linear(backbone.num_features, dim)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.features(pixels)), dim=-1)


def conv_student(spec: ImageStudentSpec, dim: int) -> ConvEmbeddingTower:
    """EfficientNet-Lite0 (ImageNet weights) at ``spec``'s size and shape, with a fresh projection to ``dim``.

    ``fit_projection`` gives the projection its starting point from the teacher's embeddings.
    """
    return ConvEmbeddingTower(lite_student(efficientnet_lite0(), spec), dim).eval()


@torch.no_grad()
def fit_projection(student: ConvEmbeddingTower, pixels: Callable[[np.ndarray], np.ndarray], rows: int,
                   targets: torch.Tensor, ridge: float = 1e-2) -> float:
    """Set the projection to the ridge-regression map from the backbone's pooled features to ``targets``.

    Training then starts from the best linear read-out of the ImageNet features
    instead of a random one. Returns the mean cosine it reaches on these rows.
    """
    student.eval()
    feats = torch.cat([student.features(torch.from_numpy(pixels(np.arange(i, min(i + TEACHER_CHUNK, rows)))))
                       for i in range(0, rows, TEACHER_CHUNK)]).double()
    mean = feats.mean(0)
    x = feats - mean
    y = targets.double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ y)  # (features, dim)
    student.projection.weight.copy_(weight.T.float())
    student.projection.bias.copy_((y.mean(0) - mean @ weight).float())
    return float(F.cosine_similarity(student(torch.from_numpy(pixels(np.arange(min(rows, 256))))),
                                     targets[:min(rows, 256)], dim=-1).mean())


def count_flops(module: nn.Module, size: int) -> int:
    """Floating-point operations of one forward pass on a single ``size``×``size`` image (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.eval()(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- data


@dataclass
class ImageSet:
    """Images to distil on, each with a group that the held-out split keeps together, and views per image."""

    images: list[Any]  # RGB uint8 arrays or paths (read when views are drawn)
    groups: list[int]  # per image: its group (a source image; a folder's files are each their own)
    views: list[int]  # per image: how many random crops/flips to draw
    source: str  # where the images came from, for reports

    def __len__(self) -> int:
        return len(self.images)


def read_image_folder(path: str | Path, target_views: int = TARGET_VIEWS) -> ImageSet:
    """The image files under a folder (recursively), each its own group, with views spread to ``target_views``.

    Raises:
        InputError: Not a folder, no image files, or fewer than ``MIN_IMAGES``.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"image data '{path}' is not a folder; give a folder of unlabelled images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < MIN_IMAGES:
        raise InputError(f"image data '{path}' holds {len(files)} image file(s); distilling needs at least "
                         f"{MIN_IMAGES} to train on some and hold some out (hundreds to thousands for a useful "
                         "student).")
    views = max(1, min(32, math.ceil(target_views / len(files))))
    return ImageSet(list(files), list(range(len(files))), [views] * len(files), str(path))


def _extra_pictures() -> list[np.ndarray]:
    """Pictures in the eval extra's wheels that the sample photos (the gate's) do not use."""
    import skimage.data as skdata
    from matplotlib import get_data_path
    from PIL import Image

    pictures = [*skdata.stereo_motorcycle()[:2]]
    for name in ("retina", "immunohistochemistry", "cell", "colorwheel", "logo", "page", "text"):
        pictures.append(getattr(skdata, name)())
    for name in ("Minduka_Present_Blue_Pack.png", "logo2.png"):
        with Image.open(Path(get_data_path()) / "sample_data" / name) as im:
            pictures.append(np.asarray(im.convert("RGB")))
    return [_rgb(p) for p in pictures]


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def default_image_data(fashion: int = 2000, picture_views: int = 24) -> ImageSet:
    """Packaged images the distillation gate never measures on, with the views each gets.

    Fashion-MNIST *training* images (the gate uses test images), even-numbered
    emoji (the gate uses odd ones), the even half of the LFW faces (the gate uses the odd half), its
    non-faces, and pictures of
    scikit-image and matplotlib that are not sample photos. Sources that are not
    installed are left out; the description says what was used.

    Raises:
        InputError: Fewer than ``MIN_IMAGES`` images in all (install the eval extra
            and ``dataset-fashion-mnist``, or give a folder).
    """
    from edgemm.export.calibration import _emoji, _fashion_images

    images: list[np.ndarray] = []
    views: list[int] = []
    parts = []
    try:
        import skimage.data as skdata

        from edgemm.export.calibration import lfw_faces

        pictures = _extra_pictures()
        faces = lfw_faces(0) + [_rgb(f) for f in skdata.lfw_subset()[100:]]  # the gate measures on odd faces
    except ImportError:
        pictures, faces = [], []
    images += pictures + faces
    views += [picture_views] * len(pictures) + [1] * len(faces)
    parts += [f"{len(pictures)} pictures x {picture_views} crops",
              f"{len(faces)} LFW images (even faces, non-faces)"] if pictures else []
    emoji = [rgb for _, rgb in _emoji()[0::2]]
    images += emoji
    views += [2] * len(emoji)
    parts.append(f"{len(emoji)} even-numbered emoji x 2")
    clothes, _ = _fashion_images("train", 0, fashion)
    images += clothes
    views += [1] * len(clothes)
    parts.append(f"{len(clothes)} Fashion-MNIST training images")
    if len(images) < MIN_IMAGES:
        raise InputError("the packaged images are not installed (the eval extra, dataset-fashion-mnist, "
                         "fonts-noto-color-emoji); install them or give a folder of images with --data.")
    return ImageSet(images, list(range(len(images))), views, "packaged images: " + ", ".join(parts))


def split_images(data: ImageSet, held_out_fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(training, held-out) images, keeping each group on one side.

    Raises:
        InputError: Too few images or groups to hold any out.
    """
    needed = max(2, math.ceil(1.0 / held_out_fraction))
    if len(set(data.groups)) < needed:
        raise InputError(f"{data.source} gives {len(set(data.groups))} distinct image(s): too few to hold "
                         f"{held_out_fraction:.0%} out and still train; give at least {needed}.")
    mask = held_out_mask(data.groups, held_out_fraction, seed)
    pick = lambda keep: ImageSet(*([x for x, m in zip(column, mask) if m == keep]  # noqa: E731
                                   for column in (data.images, data.groups, data.views)), data.source)
    return pick(False), pick(True)


def _crop(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of 40–100% of the short side, flipped half the time."""
    h, w = rgb.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(0.4, 1.0))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = rgb[top:top + side, left:left + side]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


@dataclass
class ImageTeacher:
    """An image tower to imitate and how its outputs are compared.

    Attributes:
        outputs: Normalised pixels (N, 3, S, S) → the targets, (N, K) float32: class logits
            (or anything softmax treats alike, e.g. T · log of the tower's probabilities) or unit embeddings.
            The bundle's own graph on ONNX Runtime serves well: it is the deployed teacher, and faster
            than PyTorch on a CPU.
        preprocess: Its input preprocessing (the bundle's).
        identity: Names the teacher's weights (e.g. a hash of its graph), for checkpoints.
        kind: ``"logits"`` (compared by ``logit_kd_loss`` at ``temperature``) or ``"embedding"`` (1 − cosine).
        temperature: For logits.
        embed: Targets or student outputs → unit embeddings, for the held-out cosine (identity for embeddings).
    """

    outputs: Callable[[np.ndarray], np.ndarray]
    preprocess: ImagePreprocess
    identity: str
    kind: str = "embedding"
    temperature: float = 1.0
    embed: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows

    @classmethod
    def of_module(cls, module: nn.Module, preprocess: ImagePreprocess, **kwargs: Any) -> ImageTeacher:
        """A PyTorch module as the teacher (run in eval mode, without gradients)."""
        module.eval()

        @torch.no_grad()
        def outputs(pixels: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(pixels)).numpy()

        return cls(outputs, preprocess, _hash_module(module), **kwargs)


def draw_views(data: ImageSet, student: ImagePreprocess, teacher: ImageTeacher, seed: int,
               limit: int = MAX_VIEWS) -> tuple[np.ndarray, torch.Tensor]:
    """Every image's views at the student's size (uint8 (N, S, S, 3)) and the teacher's outputs on them.

    The first view of an image is the whole image (the runtime's centre crop),
    the others random crops and flips; both sides go through the runtime's own
    resizing, so training sees what deployment feeds. The teacher runs chunk by
    chunk as views are drawn, so only the small views stay in memory.

    Raises:
        InputError: An image cannot be read (the message names it).
    """
    rng = np.random.default_rng([seed, 7])
    small, big = ImagePreprocessor(student), ImagePreprocessor(teacher.preprocess)
    views: list[np.ndarray] = []
    targets: list[torch.Tensor] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        pixels = pixels_of(np.stack(pending), teacher.preprocess)(np.arange(len(pending)))
        targets.append(torch.from_numpy(np.asarray(teacher.outputs(pixels), np.float32)))
        pending.clear()

    for i, (image, count) in enumerate(zip(data.images, data.views)):
        if len(views) >= limit:
            break
        rgb = to_rgb(image, "rgb", where=f"image '{image}'" if isinstance(image, (str, Path)) else f"image {i}")
        for crop in [rgb] + [_crop(rgb, rng) for _ in range(count - 1)][:limit - len(views) - 1]:
            views.append(small.resize(crop))
            pending.append(big.resize(crop))
            if len(pending) == TEACHER_CHUNK:
                flush()
    if pending:
        flush()
    return np.stack(views), torch.cat(targets)


def pixels_of(views: np.ndarray, spec: ImagePreprocess) -> Callable[[np.ndarray], np.ndarray]:
    """Row indices → normalised NCHW float32 pixels of those views."""
    scale = (1.0 / np.asarray(spec.std, np.float32)).reshape(1, 1, 1, 3)
    shift = (-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).reshape(1, 1, 1, 3)
    return lambda idx: np.ascontiguousarray((views[idx].astype(np.float32) * scale + shift).transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------- training


def logit_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T² · KL(softmax(teacher / T) ‖ softmax(student / T)), mean over rows."""
    t = F.log_softmax(teacher / temperature, dim=-1)
    s = F.log_softmax(student / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def _hash_array(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def distill_image(teacher: ImageTeacher, student: nn.Module, student_preprocess: ImagePreprocess,
                  train_images: ImageSet, held_out_images: ImageSet, options: DistillOptions = DistillOptions(), *,
                  checkpoint_dir: str | Path | None = None, resume: bool = False,
                  progress: Progress | None = None) -> tuple[nn.Module, DistillReport]:
    """Train ``student`` (pixels at ``student_preprocess`` → the teacher's kind of output) to match ``teacher``.

    Views of the training and held-out images are drawn once (seeded) and the
    teacher's outputs on them computed once; then the shared loop of
    ``edgemm.export.distill`` trains, evaluates each epoch, stops early,
    checkpoints and resumes. A ``ConvEmbeddingTower`` student first gets the
    least-squares projection of its features onto the teacher's embeddings.

    Returns:
        The student in eval mode holding the best epoch's weights, and the report
        (``unit`` "images"; rows are views).

    Raises:
        InputError: Unreadable images, a teacher kind it does not know, or a
            checkpoint problem (see ``distill_text``).
    """
    if teacher.kind not in ("logits", "embedding"):
        raise InputError(f"image teacher kind must be 'logits' or 'embedding', got {teacher.kind!r}.")
    folder = _start(checkpoint_dir, resume)
    with torch.random.fork_rng(devices=[]), _threads(options.threads):
        torch.manual_seed(options.seed)
        views, targets = draw_views(train_images, student_preprocess, teacher, options.seed)
        held_views, held_targets = draw_views(held_out_images, student_preprocess, teacher, options.seed + 1,
                                              limit=MAX_VIEWS // 8)
        train_pixels, held_pixels = pixels_of(views, student_preprocess), pixels_of(held_views, student_preprocess)
        if isinstance(student, ConvEmbeddingTower) and not resume:
            fit_projection(student, train_pixels, len(views), targets)

        if teacher.kind == "logits":
            def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return logit_kd_loss(out, target, teacher.temperature)
        else:  # the text students' embedding losses (cosine, MSE, in-batch similarity KL), as the options weigh them
            def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return _loss(out, target, None, options)

        task = _Task("images", lambda idx, held: {"pixels": (held_pixels if held else train_pixels)(idx)},
                     (np.zeros(len(views)), np.zeros(len(held_views))), loss, embed=teacher.embed)
        identity = {"teacher": teacher.identity,
                    "tokenizer": hashlib.sha256(repr((teacher.preprocess, student_preprocess)).encode()).hexdigest()}
        data = _hash_array(views, held_views) if folder else ""
        params = dict(student.named_parameters())
        return train(student, params, task, (targets, held_targets), options, folder, identity if folder else {},
                     data, resume, progress)


def student_preprocess(teacher: ImagePreprocess, spec: ImageStudentSpec, lite_normalisation: bool) -> ImagePreprocess:
    """The student's preprocessing: the teacher's crop at the student's size; Lite's normalisation when asked."""
    if lite_normalisation:
        return replace(LITE_IMAGE, size=spec.size, crop_fraction=teacher.crop_fraction, resize=teacher.resize)
    return replace(teacher, size=spec.size)


# Training defaults for image students (measured in benchmarks/results/distill-image-study.md): a gentler
# learning rate than the text students', since every weight starts from a trained net.
IMAGE_OPTIONS = DistillOptions(epochs=4, lr=3e-4, batch_size=32)
