"""``edgemm distill``: a bundle's text or image tower → a smaller student bundle that keeps its teacher's answers.

The steps:

1. Rebuild the teacher, the PyTorch model the bundle was exported from: the
   default model from its packaged weights, or the user's checkpoint folder the
   manifest records. It is checked against the bundle's own graph first, so a
   teacher that is not the bundle's fails before any training.
2. Make the student — text: teacher layers kept by selection, optionally
   narrower feed-forward blocks (``edgemm.export.distill``); image: a smaller,
   lower-resolution convolutional net (``edgemm.export.distill_image``) — and
   distil it on the user's texts or images or on packaged data, with a held-out
   split kept apart by group. Checkpoints go to ``<out>.distill/``; running the
   same command again after an interruption resumes there.
3. Export the student as the bundle's graph for that tower (the same output
   space as the teacher's; an image student records its own input size) and
   verify it against its PyTorch module like every export.
4. Gate the staged student bundle against the teacher bundle on held-out data
   (the quantization gate's figures: embedding cosine, zero-shot top-1 of both
   side by side, retrieval recall), plus zero-shot *retention* (student top-1 /
   teacher top-1), and measure the graph's speed-up (text: batch 32; image: one
   frame and batch 16). A student below the user's thresholds is not written
   unless the degradation is accepted.

Everything happens in a staging directory; the bundle appears only at the end.
This is workstation code: it needs the ``export`` extra (torch, transformers).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgemm._bench_worker import interleaved
from edgemm._gate import GateThresholds, compare, measure, summary
from edgemm._model import DualEncoder
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError, VerificationError

TOWERS = ("text", "image")  # towers a student can replace
SPEED_BATCH = 32  # texts per call when timing teacher vs student
IMAGE_SPEED_BATCH = 16  # images per call in the batched image timing (besides one frame)
SPEED_SECONDS = 3.0  # least time the timing runs (alternating blocks of calls, the benchmark harness's way)
SPEED_CALLS = 21  # least calls per side
TEACHER_MATCH = 0.9999  # least cosine between the rebuilt teacher and the bundle's graph of that tower


class DistillGateError(VerificationError):
    """The student missed the retention thresholds; nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class DistillThresholds:
    mean_cosine: float = 0.95  # text embedding cosine to the teacher, mean over held-out texts
    retention: float = 0.95  # student zero-shot top-1 / teacher's, over the labelled evaluation sets
    top1_agreement: float = 0.95  # the teacher's top label kept, over the gate's diverse held-out label sets

    def __post_init__(self) -> None:
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise InputError(f"distill threshold top1_agreement must be in [0, 1], got {self.top1_agreement}.")
        if not -1.0 <= self.mean_cosine <= 1.0:
            raise InputError(f"distill threshold mean_cosine is a cosine in [-1, 1], got {self.mean_cosine}.")
        if self.retention < 0.0:
            raise InputError(f"distill threshold retention must be 0 or more, got {self.retention}.")


@dataclass
class Teacher:
    """The PyTorch text tower a bundle was exported from, and what distilling it needs."""

    tower: Any  # nn.Module: (input_ids[, attention_mask]) → unit embeddings
    feeds: Callable[[Sequence[str]], dict[str, np.ndarray]]  # reference tokenizer, truncating training texts
    spec: Any  # the text graph's ExportSpec
    other: np.ndarray | None  # the image side's embeddings for the cross-modal loss
    description: str  # what the teacher is, for the report


def _default_teacher(bundle: Bundle) -> Teacher:
    from edgemm.export.distill import TRAIN_MAX_LENGTH
    from edgemm.export.models.dual_encoder import TEXT_ENCODER, TextEmbedder
    from edgemm.export.models.text import minilm_dir, minilm_l6

    tower = minilm_l6()
    embedder = TextEmbedder(tower, minilm_dir(), max_length=TRAIN_MAX_LENGTH)
    other = np.load(bundle.file(bundle.manifest.scoring.class_embeddings))
    return Teacher(tower, embedder.feeds, TEXT_ENCODER, other, "all-MiniLM-L6-v2 (packaged weights)")


def _checkpoint_teacher(bundle: Bundle, runtime: DualEncoder, images: Sequence[Any] | None) -> Teacher:
    from edgemm.export.calibration import calibration_data
    from edgemm.export.distill import TRAIN_MAX_LENGTH
    from edgemm.export.models.clip import Checkpoint, _specs

    folder = _checkpoint_folder(bundle)
    ckpt = Checkpoint(folder)

    def feeds(texts: Sequence[str]) -> dict[str, np.ndarray]:
        batch = ckpt.tokenizer(list(texts), padding=ckpt.arch.padding, truncation=True,
                               max_length=min(TRAIN_MAX_LENGTH, ckpt.max_length), return_tensors="np")
        return {name: batch[name].astype(np.int64) for name in ckpt.arch.text_inputs}

    if images is None:  # the packaged calibration images: sample photos (augmented) and Fashion-MNIST
        images = calibration_data(None, None)[0].images
    other = runtime.embed_images(list(images), color="rgb")
    return Teacher(ckpt.text_tower, feeds, _specs(ckpt.image_size, ckpt.arch.text_inputs)[1], other,
                   f"{ckpt.arch.model_class} from {folder}")


def _check_source(bundle: Bundle, tower: str) -> Any:
    """The manifest of a bundle whose ``tower`` can be distilled: an fp32 dual encoder, that tower its teacher's."""
    m = bundle.manifest
    if m.family != "dual_encoder":
        raise BundleError(f"'{bundle.path}' is a {m.family!r} bundle; distil the dual encoder it was built on.")
    if m.precision != "fp32":
        raise BundleError(f"'{bundle.path}' is {m.precision}; distil the fp32 bundle, then quantize the student.")
    if tower in m.distilled_towers:
        raise BundleError(f"the {tower} tower of '{bundle.path}' is already a distilled student; distil from its "
                          f"teacher bundle '{m.source['distilled_from'].get('path')}'.")
    return m


def _checkpoint_folder(bundle: Bundle) -> Path:
    folder = Path(bundle.manifest.source.get("path", ""))
    if not (folder / "config.json").is_file():
        raise BundleError(f"bundle '{bundle.path}' was exported from the checkpoint folder '{folder}', which is not "
                          "there any more; distilling needs that teacher. Restore the folder (or re-export the "
                          "bundle from where it now is) and run again.")
    return folder


def _unknown_origin(bundle: Bundle, kind: Any) -> BundleError:
    return BundleError(f"'{bundle.path}' does not record where its model came from (source kind {kind!r}); "
                       "distilling needs the PyTorch teacher.")


def teacher_of(bundle: Bundle, images: Sequence[Any] | None = None) -> Teacher:
    """Rebuild the PyTorch text tower ``bundle`` was exported from, and check it is that tower.

    Args:
        bundle: An fp32 dual-encoder bundle exported by edgemm.
        images: Images whose embeddings (by the bundle's image graph) anchor the
            cross-modal loss of checkpoint teachers (default: the packaged calibration images;
            the default model uses its class embeddings instead).

    Raises:
        BundleError: Not an fp32 dual encoder, already distilled, of unknown
            origin, its checkpoint folder is gone, or the rebuilt teacher does
            not reproduce the bundle's text graph.
    """
    import torch

    kind = _check_source(bundle, "text").source.get("kind")
    runtime = DualEncoder(bundle, threads=None)
    if kind == "default":
        teacher = _default_teacher(bundle)
    elif kind == "huggingface":
        teacher = _checkpoint_teacher(bundle, runtime, images)
    else:
        raise _unknown_origin(bundle, kind)
    from edgemm.runtime.datasets import SAMPLE_SENTENCES

    with torch.no_grad():
        feeds = teacher.feeds(list(SAMPLE_SENTENCES))
        rebuilt = teacher.tower(*(torch.from_numpy(feeds[t.name]) for t in teacher.spec.inputs)).numpy()
    _check_rebuilt(bundle, "text", teacher.description, runtime.embed_texts(list(SAMPLE_SENTENCES)), rebuilt,
                   "real sentences")
    return teacher


def _check_rebuilt(bundle: Bundle, tower: str, description: str, graph: np.ndarray, rebuilt: np.ndarray,
                   inputs: str) -> None:
    """Refuse a rebuilt teacher whose embeddings are not the bundle's graph's (the weights changed since export)."""
    worst = float((graph * rebuilt).sum(1).min())
    if worst < TEACHER_MATCH:
        raise BundleError(f"the {tower} tower rebuilt for '{bundle.path}' ({description}) does not reproduce the "
                          f"bundle's {tower} graph (worst cosine {worst:.4f} on {inputs}); the weights changed "
                          "since export. Re-export the bundle from the teacher you mean to distil.")


def _retention(report: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot top-1 of teacher and student over the labelled sets, and their ratio."""
    sets = [s for s in report["label_sets"] if "source_top1" in s]
    teacher = sum(s["source_top1"] * s["images"] for s in sets)
    student = sum(s["candidate_top1"] * s["images"] for s in sets)
    images = sum(s["images"] for s in sets)
    return {"teacher_top1": teacher / images, "student_top1": student / images, "images": images,
            "retention": student / teacher if teacher else 1.0}


def graph_speed(runs: dict[Any, tuple[Any, dict[str, np.ndarray]]]) -> dict[Any, float]:
    """Median ms per call of each (backend, feeds), timed as ``edgemm bench`` times: alternating blocks."""
    times = interleaved({name: partial(backend.infer, feeds) for name, (backend, feeds) in runs.items()},
                        warmup=1, min_time=SPEED_SECONDS, min_iters=SPEED_CALLS)
    return {name: float(np.median(t)) for name, t in times.items()}


def text_speed(teacher: DualEncoder, student: DualEncoder, texts: Sequence[str]) -> dict[str, Any]:
    """Median ms of the text graph at batch ``SPEED_BATCH``, teacher vs student, in alternating rounds."""
    feeds = teacher.text_feeds(list(texts[:SPEED_BATCH]))
    ms = graph_speed({"teacher": (teacher.text_backend, feeds), "student": (student.text_backend, feeds)})
    return {"graph": "text", "batch": len(texts[:SPEED_BATCH]), "tokens": int(feeds["input_ids"].shape[1]),
            "teacher_ms": ms["teacher"], "student_ms": ms["student"], "speedup": ms["teacher"] / ms["student"]}


def image_speed(teacher: DualEncoder, student: DualEncoder, images: Sequence[Any]) -> dict[str, Any]:
    """Median ms of the image graph on one frame and on a batch of ``IMAGE_SPEED_BATCH``, teacher vs student."""
    out: dict[str, Any] = {"graph": "image"}
    for batch in (1, IMAGE_SPEED_BATCH):
        chosen = [images[i % len(images)] for i in range(batch)]
        ms = graph_speed({name: (model.image_backend, {"pixels": model.preprocess(chosen, color="rgb")})
                          for name, model in (("teacher", teacher), ("student", student))})
        key = "" if batch == 1 else f"_batch{batch}"
        out.update({f"teacher_ms{key}": ms["teacher"], f"student_ms{key}": ms["student"],
                    f"speedup{key}": ms["teacher"] / ms["student"]})
    out.update(batch=1, pixels=[teacher.preprocess.size, student.preprocess.size])
    return out


def distill_summary(info: dict[str, Any]) -> str:
    """Printable lines: training, the gate's figures, retention and speed."""
    r, s = info["retention"], info["speed"]
    lines = [
        info["training"]["summary"],
        summary(info["gate"]).rsplit("\n", 1)[0],  # its last line is the gate verdict, given below
        f"zero-shot top-1 over {r['images']} labelled images: teacher {r['teacher_top1']:.1%}, student "
        f"{r['student_top1']:.1%} (retention {r['retention']:.1%})",
        f"text graph, batch {s['batch']} ({s['tokens']} tokens): teacher {s['teacher_ms']:.1f} ms, student "
        f"{s['student_ms']:.1f} ms ({s['speedup']:.2f}x)" if s["graph"] == "text" else
        f"image graph, one frame ({s['pixels'][0]} -> {s['pixels'][1]} px): teacher {s['teacher_ms']:.1f} ms, "
        f"student {s['student_ms']:.1f} ms ({s['speedup']:.2f}x); batch {IMAGE_SPEED_BATCH}: "
        f"{s[f'speedup_batch{IMAGE_SPEED_BATCH}']:.2f}x",
        "distillation gate: PASSED" if info["passed"] else
        "distillation gate: FAILED (" + "; ".join(info["failures"]) + ")",
    ]
    return "\n".join(lines)


@dataclass
class _Student:
    """A trained student and what writing its bundle needs, whichever tower it replaces."""

    module: Any  # nn.Module exported as the graph of ``spec.role``
    spec: Any  # its ExportSpec
    verify_feeds: list[dict[str, np.ndarray]]  # inputs to check the ONNX graph against ``module`` on
    verify_description: str
    manifest: dict[str, Any]  # manifest fields the student changes (e.g. image preprocessing)
    training: Any  # DistillReport
    data: dict[str, Any]  # what it was trained and held out on, for the report
    describe: dict[str, Any]  # spec, teacher description, parameter counts
    held_out: list[Any]  # held-out texts / images for the gate and the timing
    user_held_out: Any = None  # the user's held-out images for the gate (a calibration DataSet)


def label_scorer(bundle: Bundle, threads: int | None = None) -> Any:
    """The bundle's own label scoring on the packaged calibration images (never the gate's), for label-score KL.

    Raises:
        InputError: Sigmoid scoring (no distribution over a label set).
    """
    from edgemm.export.calibration import calibration_data
    from edgemm.export.distill import LabelScorer

    model = DualEncoder(bundle, threads=threads)
    s = bundle.manifest.scoring
    outputs = model._run_images(list(calibration_data(None, None)[0].images), "rgb", 32)
    if s.kind == "class_space":
        return LabelScorer.from_arrays("class_space", outputs[s.class_output], model._class_embeddings, 1.0 / s.tau)
    return LabelScorer.from_arrays(s.kind, outputs["embedding"], None, s.logit_scale)


def _text_student(src: Bundle, student: str | None, data: Any, options: Any, folder: Path, resume: bool,
                  step: Callable[[str], None], train_progress: Any) -> _Student:
    from edgemm.export import distill as d
    from edgemm.runtime.datasets import SAMPLE_SENTENCES

    if student is None:
        student = d.DEFAULT_STUDENT if src.manifest.source.get("kind") == "default" else "layers=3"
    spec = d.parse_student_spec(student)
    corpus = d.read_corpus(data) if data is not None else d.default_text_corpus()
    train_texts, held_out = d.split_corpus(corpus, options.held_out_fraction, options.seed)
    step("rebuilding the teacher and checking it against the bundle")
    teacher = teacher_of(src)
    pupil = d.text_student(teacher.tower, spec.layers, spec.ffn)
    step(f"{'resuming' if resume else 'distilling'} the text student ({student}) on {len(train_texts)} texts")
    scorer = label_scorer(src, options.threads) if options.label_kl_weight else None
    pupil, training = d.distill_text(teacher.tower, teacher.feeds, pupil, train_texts, held_out, options,
                                     checkpoint_dir=folder, resume=resume, other_embeddings=teacher.other,
                                     progress=train_progress, label_scorer=scorer)
    sentences = list(SAMPLE_SENTENCES)
    return _Student(
        pupil, teacher.spec, [teacher.feeds(sentences[:1]), teacher.feeds(sentences), teacher.feeds(held_out[:64])],
        "real sentences and held-out corpus texts", {}, training,
        {"source": corpus.source, "texts": len(corpus), "train": len(train_texts), "held_out": len(held_out)},
        {"student": spec.to_dict(), "teacher": teacher.description,
         "student_parameters": sum(p.numel() for p in pupil.parameters()),
         "teacher_parameters": sum(p.numel() for p in teacher.tower.parameters())},
        held_out)


@dataclass
class ImageSide:
    """A bundle's image tower rebuilt in PyTorch, and how to make students of it."""

    teacher: Any  # edgemm.export.distill_image.ImageTeacher: what the students imitate
    tower: Any  # nn.Module: the whole tower as the bundle's graph computes it (pixels → its outputs)
    spec: Any  # the image graph's ExportSpec
    description: str
    make: Callable[[Any], tuple[Any, Any, Any]]  # ImageStudentSpec → (trained module, exported module, preprocess)


def _image_spec(template: Any, size: int) -> Any:
    import torch

    from edgemm.runtime.manifest import TensorSpec

    return replace(template, inputs=(TensorSpec("pixels", "float32", ["batch", 3, size, size]),),
                   dummy_inputs=lambda: (torch.zeros(2, 3, size, size),))


def image_side_of(bundle: Bundle, threads: int | None = None) -> ImageSide:
    """Rebuild the PyTorch image tower ``bundle`` was exported from, and check it is that tower.

    The students start from the rebuilt tower's weights (or its embedding size); the targets they
    learn come from the bundle's own image graph on ONNX Runtime, which the check shows to be the
    same function and which runs several times faster than PyTorch on a CPU.

    Raises:
        BundleError: As ``teacher_of``: not an fp32 dual encoder of known origin,
            or the rebuilt tower does not reproduce the bundle's image graph.
    """
    import torch

    from edgemm.export import distill_image as di

    m = _check_source(bundle, "image")
    runtime = DualEncoder(bundle, threads=threads)
    graph = hashlib.sha256(bundle.graph_path("image_encoder").read_bytes()).hexdigest()

    def graph_outputs(name: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda pixels: runtime.image_backend.infer({"pixels": pixels})[name]

    kind = m.source.get("kind")
    if kind == "default":
        from edgemm.export.models.dual_encoder import IMAGE_ENCODER, ConseImageTower
        from edgemm.export.models.efficientnet_lite import efficientnet_lite0

        join = m.source["join"]
        classes = torch.from_numpy(np.load(bundle.file(m.scoring.class_embeddings)))
        tower = ConseImageTower(efficientnet_lite0(), classes, temperature=join["temperature"], top_k=join["top_k"])
        probs = graph_outputs("class_probs")  # softmax(logits / T): T · log(probs) are logits to softmax alike
        teacher = di.ImageTeacher(lambda pixels: tower.temperature * np.log(np.maximum(probs(pixels), 1e-30)),
                                  m.image, graph, "logits", tower.temperature, embed=lambda logits: tower.join(logits)[0])

        def make(spec: Any) -> tuple[Any, Any, Any]:
            classifier = di.lite_student(tower.classifier, spec)
            exported = ConseImageTower(classifier, classes, temperature=tower.temperature, top_k=tower.top_k).eval()
            return classifier, exported, replace(m.image, size=spec.size)

        side = ImageSide(teacher, tower.eval(), IMAGE_ENCODER, "EfficientNet-Lite0 (packaged ImageNet weights)", make)
    elif kind == "huggingface":
        from edgemm.export.models.clip import Checkpoint, _specs

        ckpt = Checkpoint(_checkpoint_folder(bundle))

        def make(spec: Any) -> tuple[Any, Any, Any]:
            student = di.conv_student(spec, ckpt.embedding_dim)
            return student, student, di.student_preprocess(m.image, spec, lite_normalisation=True)

        side = ImageSide(di.ImageTeacher(graph_outputs("embedding"), m.image, graph, "embedding"), ckpt.image_tower,
                         _specs(ckpt.image_size, ckpt.arch.text_inputs)[0],
                         f"{ckpt.arch.model_class} vision tower from {ckpt.folder}", make)
    else:
        raise _unknown_origin(bundle, kind)
    from edgemm.runtime.datasets import sample_photos

    photos = [p.image for p in sample_photos()]
    with torch.no_grad():
        out = side.tower(torch.from_numpy(runtime.preprocess(photos, color="rgb")))
    _check_rebuilt(bundle, "image", side.description, runtime.embed_images(photos, color="rgb"),
                   (out[0] if isinstance(out, tuple) else out).numpy(), "the sample photos")
    return side


def _image_student(src: Bundle, student: str | None, data: Any, options: Any, folder: Path, resume: bool,
                   step: Callable[[str], None], train_progress: Any) -> _Student:
    from edgemm.export import distill_image as di
    from edgemm.export.calibration import DataSet

    spec = di.parse_image_student_spec(student or di.DEFAULT_IMAGE_STUDENT)
    images = di.read_image_folder(data) if data is not None else di.default_image_data()
    train_images, held_images = di.split_images(images, options.held_out_fraction, options.seed)
    step("rebuilding the image tower and checking it against the bundle")
    side = image_side_of(src, options.threads)
    trained, exported, preprocess = side.make(spec)
    teacher_size, student_size = src.manifest.image.size, spec.size
    teacher_flops, student_flops = di.count_flops(side.tower, teacher_size), di.count_flops(exported, student_size)
    if student_flops >= teacher_flops:
        raise InputError(f"the image student {student or di.DEFAULT_IMAGE_STUDENT} ({student_flops / 1e9:.2f} GFLOPs "
                         f"at {student_size} px) is not smaller than its teacher ({teacher_flops / 1e9:.2f} GFLOPs at "
                         f"{teacher_size} px); choose a lower size, depth or expand, or a preset "
                         f"({', '.join(di.list_image_students())}).")
    step(f"{'resuming' if resume else 'distilling'} the image student ({student or di.DEFAULT_IMAGE_STUDENT}) on "
         f"{len(train_images)} images ({images.source})")
    trained, training = di.distill_image(side.teacher, trained, preprocess, train_images, held_images, options,
                                         checkpoint_dir=folder, resume=resume, progress=train_progress)
    from edgemm.runtime.datasets import sample_photos
    from edgemm.runtime.image import ImagePreprocessor

    pixels = ImagePreprocessor(preprocess)([p.image for p in sample_photos()], color="rgb")
    user_held_out = DataSet(images=list(held_images.images)) if data is not None else None
    return _Student(
        exported.eval(), _image_spec(side.spec, spec.size), [{"pixels": pixels[:1]}, {"pixels": pixels}],
        "real sample photos", {"image": asdict(preprocess)}, training,
        {"source": images.source, "images": len(images), "train": len(train_images), "held_out": len(held_images)},
        {"student": spec.to_dict(), "teacher": side.description,
         "student_parameters": sum(p.numel() for p in exported.parameters()),
         "teacher_parameters": sum(p.numel() for p in side.tower.parameters()),
         "student_gflops": student_flops / 1e9, "teacher_gflops": teacher_flops / 1e9},
        [p.image for p in sample_photos()], user_held_out)


def distill_bundle(
    source: str | Path,
    out_dir: str | Path,
    *,
    tower: str = "text",
    student: str | None = None,
    data: str | Path | None = None,
    options: Any = None,
    thresholds: DistillThresholds = DistillThresholds(),
    accept_degradation: bool = False,
    checkpoint_dir: str | Path | None = None,
    restart: bool = False,
    eval_images: int = 1000,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Distil a bundle's text or image tower into a student and write it as a gated bundle.

    Args:
        source: The teacher: an fp32 dual-encoder bundle.
        out_dir: Bundle directory to create.
        tower: ``"text"`` or ``"image"``.
        student: Text: a preset name or ``layers=N`` / ``layers=I,J,K`` [``,ffn=W``]; ``None``: the measured
            preset ``DEFAULT_STUDENT`` for the default (MiniLM) teacher, else ``layers=3``. Image: a preset
            name or ``size=S[,depth=D][,expand=F]``; ``None``: ``DEFAULT_IMAGE_STUDENT``.
        data: Text: a text file (one text per line) or folder of ``.txt`` files; image: a folder of
            unlabelled images. ``None``: packaged data (ImageNet names in prompts and class descriptions;
            images the gate does not use).
        options: ``edgemm.export.distill.DistillOptions`` (``None``: the tower's defaults,
            ``DistillOptions()`` or ``distill_image.IMAGE_OPTIONS``).
        thresholds: The retention gate, on the distilled tower's embedding cosine.
        accept_degradation: Write the student even when it misses the thresholds (recorded).
        checkpoint_dir: Where training checkpoints go (default ``<out_dir>.distill``);
            a checkpoint there is resumed. Removed once the bundle is written.
        restart: Discard an existing checkpoint instead of resuming it.
        eval_images: Fashion-MNIST test images in the zero-shot comparison (besides the sample photos).
        overwrite: Replace an existing bundle.
        threads: Threads for training and for ONNX Runtime while measuring.
        progress: ``progress(stage, done, total, metrics)``; stage is ``"train"``
            (steps) or ``"step"`` (a description in ``metrics["message"]``).

    Returns:
        (the written manifest, the distillation report).

    Raises:
        InputError: Unknown tower, bad student spec or data, a student not smaller than its teacher.
        BundleError: The source cannot be distilled (see :func:`teacher_of`).
        VerificationError: The exported student drifts from its PyTorch module.
        DistillGateError: The student missed the thresholds and the degradation was not accepted.
    """
    from edgemm.export.bundle_writer import BundleWriter
    from edgemm.export.calibration import gate_data
    from edgemm.export.distill import CHECKPOINT_NAME, DistillOptions
    from edgemm.export.distill_image import IMAGE_OPTIONS
    from edgemm.export.onnx_export import export_onnx, verify_onnx

    if tower not in TOWERS:
        raise InputError(f"cannot distil the {tower!r} tower; choose from {list(TOWERS)}.")
    report_to = progress or (lambda *_args: None)

    def step(message: str) -> None:
        report_to("step", 0, 0, {"message": message})

    options = options or replace(IMAGE_OPTIONS if tower == "image" else DistillOptions(), threads=threads)
    src = Bundle(source)
    _check_source(src, tower)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"'{out_dir}' already exists; choose another path or pass --force.")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(out_dir.name + ".distill")
    if restart and folder.exists():
        shutil.rmtree(folder)
    resume = (folder / CHECKPOINT_NAME).is_file()
    started = time.perf_counter()
    train_progress = lambda epoch, done, total, metrics: report_to("train", done, total, {"epoch": epoch, **metrics})  # noqa: E731
    make = _image_student if tower == "image" else _text_student
    pupil = make(src, student, data, options, folder, resume, step, train_progress)

    manifest = src.manifest
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        role = pupil.spec.role
        for rel in manifest.files:
            if rel != manifest.graphs[role].file:
                w.path(rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.file(rel), w.path(rel))
        step(f"exporting the student's {pupil.spec.file}")
        graph = w.path(pupil.spec.file)
        export_onnx(pupil.module, pupil.spec, graph)
        step("verifying the student graph against its PyTorch module")
        verification = verify_onnx(pupil.module, pupil.spec, graph, pupil.verify_feeds,
                                   description=pupil.verify_description)
        fields = {k: v for k, v in manifest.to_dict().items() if k not in ("schema_version", "files", "tools", "created")}
        fields.update(pupil.manifest)
        fields["graphs"] = {**fields["graphs"], role: pupil.spec.manifest_entry()}
        earlier = {"earlier": manifest.source["distilled_from"]} if "distilled_from" in manifest.source else {}
        fields["source"] = {**manifest.source, "distilled_from": {
            "path": str(src.path), "name": manifest.name, "created": manifest.created, "tower": tower,
            "student": pupil.describe["student"], "teacher": pupil.describe["teacher"], **earlier}}
        fields["verification"] = {**manifest.verification, role: verification}
        staged = w.stage(**fields)

        step("measuring teacher and student on held-out data")
        # A text student's label sets come from the classes it never trained on.
        names = [t for t in pupil.held_out if len(t.split()) <= 3] if tower == "text" else []
        gate = gate_data(pupil.user_held_out, fashion_images=eval_images,
                         label_pool=names if len(names) >= 40 else None)
        if tower == "text":
            gate.texts = pupil.held_out[:512]
            gate.describe["texts"] = f"{len(gate.texts)} held-out corpus texts (never trained on)"
        reference = DualEncoder(src, threads=threads)
        candidate = DualEncoder(Bundle(staged, check_hashes=False), threads=threads)
        gate_report = compare(measure(reference, gate), measure(candidate, gate), gate,
                              GateThresholds(mean_cosine=0.0, worst_cosine=0.0, top1_agreement=0.0))
        retention = _retention(gate_report)
        step(f"timing the {tower} graphs")
        speed = (text_speed if tower == "text" else image_speed)(reference, candidate, pupil.held_out)
        failures = []  # the figures are the quantization gate's; the thresholds are distillation's
        mean_cosine = gate_report[f"{tower}_cosine"]["mean"]
        if mean_cosine < thresholds.mean_cosine:
            failures.append(f"{tower} mean cosine {mean_cosine:.4f} < {thresholds.mean_cosine}")
        if retention["retention"] < thresholds.retention:
            failures.append(f"zero-shot retention {retention['retention']:.1%} < {thresholds.retention:.0%}")
        if gate_report["top1_agreement"] < thresholds.top1_agreement:
            worst = min(gate_report["agreement_by_kind"].items(), key=lambda kv: kv[1])
            failures.append(f"top-1 agreement with the teacher {gate_report['top1_agreement']:.1%} < "
                            f"{thresholds.top1_agreement:.0%} over {gate_report['decisions']} held-out decisions "
                            f"(lowest: {worst[0]} {worst[1]:.1%})")
        gate_report.update(failures=failures, passed=not failures, thresholds=asdict(thresholds))
        info = {
            "tower": tower, **pupil.describe, "data": pupil.data,
            "training": {**pupil.training.to_dict(), "summary": pupil.training.summary()},
            "thresholds": asdict(thresholds), "gate": gate_report, "retention": retention, "speed": speed,
            "failures": failures, "passed": not failures, "seconds": round(time.perf_counter() - started, 1),
        }
        if failures:
            if not accept_degradation:
                more = "--epochs, more images" if tower == "image" else "--epochs, more layers, more texts"
                raise DistillGateError(
                    f"the student misses the distillation gate: {'; '.join(failures)}. Nothing was written; the "
                    f"training checkpoint stays in '{folder}'. Train longer or give a larger student ({more}), "
                    f"or pass --accept-degradation to write it anyway.\n{distill_summary(info)}", info)
            info["accepted_degradation"] = True
        if "distillation" in manifest.verification:  # the other tower's distillation, earlier
            info["earlier"] = manifest.verification["distillation"]
        fields["verification"]["distillation"] = info
        step("writing bundle")
        written = w.commit(**fields)
    shutil.rmtree(folder, ignore_errors=True)
    return written, info
