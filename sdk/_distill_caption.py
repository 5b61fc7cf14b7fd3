"""``edgemm distill CAPTIONER --tower decoder``: a decoder with fewer layers that still writes the teacher's captions.

The steps:

1. Rebuild the teacher in PyTorch — the built-in captioner from its packaged
   weights, or the user's Hugging Face folder the manifest records — and check
   it writes the bundle's own captions, token for token, on sample photos.
2. Caption unlabelled images with the teacher bundle (the runtime users run,
   with the bundle's decoding settings): the user's ``--images`` folder (every
   fifth image held out for the gate), or packaged images the gate never sees
   (crops and flips of the even-numbered sample photos, Fashion-MNIST *training*
   images, the even-numbered emoji, the even half of the LFW faces, each also
   mirrored). Their encoder states come from the teacher's image side.
3. Make the student (:func:`edgemm.export.distill_caption.decoder_student`:
   teacher layers kept, spread evenly) and train it on those captions with
   cross-entropy plus token-level KL; checkpoints go to ``<out>.distill/`` and
   the same command resumes there.
4. Export the student captioner (the teacher's image side, the student
   decoder) and verify it like every export: graphs against PyTorch, generation
   token for token against transformers' ``generate()``.
5. Gate it against the teacher bundle on held-out images (exact caption match,
   token agreement, BLEU-4 and CIDEr-D against the teacher, caption similarity)
   and time one caption and one token of each. A student that fails the gate is
   not written unless the degradation is accepted.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgemm._bench_worker import interleaved
from edgemm._caption import Captioner
from edgemm._caption_gate import CaptionGateThresholds, caption_gate_images, caption_gate_summary, compare_captions
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError, VerificationError
from edgemm.runtime.manifest import CAPTION_DECODER

DEFAULT_DECODER_LAYERS = 2  # of the built-in captioner's 4 (Whisper tiny.en); its gate figures are in the README
TRAIN_PHOTO_CROPS = 300  # crops and flips of the even-numbered sample photos
TRAIN_FASHION = 1000  # Fashion-MNIST training images
MEMORY_BATCH = 32  # images per pass of the teacher's image side
SPEED_TOKENS = 20  # new tokens per timed caption (min = max, so an early end cannot flatter either side)
SPEED_SECONDS = 3.0
PSEUDO_IMAGES = 4000  # simulated inputs captioned by the teacher, where it has them (the built-in captioner)
PSEUDO_PROFILES = 512  # real images whose class-probability profiles the pseudo images imitate
PSEUDO_SEED = 1


class CaptionDistillGateError(VerificationError):
    """The student's captions changed beyond the gate; nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class CaptionTeacher:
    """The PyTorch captioner a bundle was exported from, and how to export it with another decoder."""

    lm: Any  # the transformers decoder LM the student copies
    image_states: Any  # nn.Module: pixels → encoder states (batch, memory, width)
    parts: Callable[[Any], Any]  # student LM → CaptionerParts with that decoder
    description: str
    # Simulated inputs, where the teacher's image side allows them: (count, real images) → encoder states.
    synthetic: Callable[[int, Sequence[Any]], Any] | None = None
    synthetic_description: str = ""


def caption_teacher(bundle: Bundle) -> CaptionTeacher:
    """Rebuild the PyTorch captioner ``bundle`` was exported from.

    Raises:
        BundleError: Not an fp32 captioner bundle edgemm can rebuild (a VQA bundle, a quantized or distilled
            one, a folder that moved).
    """
    m = bundle.manifest
    if m.family != "captioner":
        raise BundleError(f"'{bundle.path}' is a {m.family} bundle; --tower decoder distils captioner bundles.")
    if m.precision != "fp32":
        raise BundleError(f"'{bundle.path}' is {m.precision}; distil from the fp32 captioner, then quantize the "
                          "student.")
    if "distilled_from" in m.source:
        raise BundleError(f"the decoder of '{bundle.path}' is already a distilled student; distil from its teacher "
                          f"'{m.source['distilled_from'].get('path')}'.")
    if m.generation is not None and m.generation.question_graph:
        raise BundleError(f"'{bundle.path}' answers questions (VQA); decoder distillation is for captioners, whose "
                          "targets are the teacher's captions of images.")
    kind = m.source.get("kind")
    if kind == "default-captioner":
        from edgemm.export.models.captioner import default_captioner_parts
        from edgemm.export.models.default_captioner import default_captioner

        c = default_captioner()
        return CaptionTeacher(c.decoder, c.image_encoder, lambda lm: default_captioner_parts(decoder=lm),
                              "the built-in captioner's Whisper tiny.en decoder (packaged weights)",
                              partial(_pseudo_images, c, m.image), "simulated tower outputs of random ImageNet classes (the adapter's pseudo images)")
    if kind == "huggingface":
        from edgemm.export.models.hf_captioner import CaptionCheckpoint

        folder = Path(m.source.get("path", ""))
        if not folder.is_dir():
            raise BundleError(f"'{bundle.path}' was exported from '{folder}', which is not a folder here; distil "
                              "where the checkpoint is, or export it again from its new place.")
        ckpt = CaptionCheckpoint(folder)

        def parts(lm: Any) -> Any:
            ckpt.use_decoder(lm)
            return ckpt.parts(m.name)

        return CaptionTeacher(ckpt.decoder_lm, ckpt.image_states, parts,
                              f"{type(ckpt.decoder_lm).__name__} of {ckpt.architecture} from {folder}")
    raise BundleError(f"'{bundle.path}' records no source edgemm can rebuild (kind {kind!r}); export it again with "
                      "edgemm export captioner.")


def _pseudo_images(c: Any, image: Any, count: int, real: Sequence[Any]) -> Any:
    """Encoder states of the built-in captioner's pseudo images (``default_captioner.PseudoImages``: tower
    outputs simulated for random ImageNet classes, shaped like real images' top-10 class profiles).

    Its image side is a tower (image → a 384-d embedding) then an adapter, so inputs far more varied than
    the packaged photos can be made in embedding space, as the adapter itself was trained.
    """
    import torch

    from edgemm.export.models.default_captioner import PseudoImages
    from edgemm.runtime.image import ImagePreprocessor

    tower, adapter = c.image_encoder.tower, c.image_encoder.adapter
    preprocess = ImagePreprocessor(image)
    with torch.no_grad():
        probs = np.concatenate([tower(torch.from_numpy(preprocess(list(real[i:i + MEMORY_BATCH]), color="rgb")))[1]
                                .numpy() for i in range(0, min(len(real), PSEUDO_PROFILES), MEMORY_BATCH)])
        pseudo = PseudoImages(tower.class_embeddings.numpy(), probs)
        rng = np.random.default_rng(PSEUDO_SEED)
        return adapter(torch.from_numpy(pseudo(rng.integers(0, len(tower.class_embeddings), count), rng))).float()


def runtime_captions(runtime: Captioner, decoder: Any, states: Any) -> list[list[int]]:
    """The bundle's captions of encoder states (not images): the runtime's generation loop and decoder graph on
    the cross-attention keys and values ``decoder`` (the teacher's ``StepDecoder``) computes from ``states``."""
    import torch

    from edgemm.runtime.generation import generate, open_decoder

    g, names = runtime.graphs, [t.name for t in runtime.encoder_backend.outputs]
    tokens = []
    for i in range(0, len(states), MEMORY_BATCH):
        with torch.no_grad():
            cross = [t.numpy() for pair in decoder.cross(states[i:i + MEMORY_BATCH]) for t in pair]
        cache = open_decoder(g.decoder_backend, g.graph, dict(zip(names, cross)))
        rows = len(cross[0])
        tokens += [h.tokens for h in generate(cache, g.prompt(rows), runtime.settings, g.spec.eos_ids, g.spec.pad_id,
                                              g.spec.max_positions)]
    return tokens


def _check_teacher(teacher: CaptionTeacher, runtime: Captioner) -> dict[str, Any]:
    """The rebuilt teacher writes the bundle's captions, token for token, on a few sample photos."""
    from edgemm.runtime.datasets import sample_photos

    photos = [p.image for p in sample_photos()[:4]]
    parts = teacher.parts(teacher.lm)
    expected = parts.reference(runtime.preprocess(photos, color="rgb"), dict(parts.settings), None)
    got = [c.token_ids for c in runtime.caption(photos, color="rgb")]
    if got != expected:
        raise BundleError(f"the captioner rebuilt for '{runtime.bundle.path}' ({teacher.description}) does not "
                          "write the bundle's captions; the weights changed since it was exported. Export it again.")
    if teacher.synthetic is not None:  # simulated inputs are captioned from their states: that path must agree
        import torch

        with torch.no_grad():
            states = teacher.image_states(torch.from_numpy(runtime.preprocess(photos, color="rgb")))
        if runtime_captions(runtime, parts.decoder, states) != got:
            raise BundleError(f"captioning encoder states directly does not give '{runtime.bundle.path}''s captions "
                              "of the same photos; the rebuilt decoder's cross-attention differs from the bundle's.")
    return {"photos": len(photos), "same_tokens": True}


def training_images(images: Any = None) -> tuple[list[Any], list[Any], str]:
    """(training images, the user's held-out images, description); packaged ones are never the gate's."""
    from edgemm.export.calibration import (_augment, _emoji, _fashion_images, gate_photo_indices, image_folder,
                                           lfw_faces, split_user_files)
    from edgemm.runtime.datasets import sample_photos

    if images is not None:
        files = image_folder(images) if isinstance(images, (str, Path)) else list(images)
        train, held = split_user_files(files)
        if len(train) < 8:
            raise InputError(f"--images: {len(files)} images give {len(train)} to train on; give at least 10 "
                             "(every fifth is held out for the gate), a few hundred for a useful student.")
        return train, held, f"{len(train)} of your images ({len(held)} more held out for the gate)"
    rng = np.random.default_rng(0)
    every = sample_photos()
    gate = set(gate_photo_indices(len(every)))
    photos = [p.image for i, p in enumerate(every) if i not in gate]
    crops = [_augment(photos[i % len(photos)], rng) for i in range(TRAIN_PHOTO_CROPS)]
    fashion, _ = _fashion_images("train", 0, TRAIN_FASHION)
    emoji = [rgb for _, rgb in _emoji()[0::2]]
    faces = lfw_faces(0)
    mirrored = [np.ascontiguousarray(im[:, ::-1]) for im in emoji + faces]
    out = crops + fashion + emoji + faces + mirrored
    return out, [], (f"{len(crops)} crops/flips of {len(photos)} even-numbered sample photos, {len(fashion)} "
                     f"Fashion-MNIST training images, {len(emoji)} even-numbered emoji and {len(faces)} even LFW "
                     "faces, each of those two also mirrored")


def _memory(teacher: CaptionTeacher, runtime: Captioner, images: Sequence[Any]) -> Any:
    import torch

    from edgemm.export.distill_caption import MAX_MEMORY_BYTES, memory_bytes

    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), MEMORY_BATCH):
            pixels = runtime.preprocess(list(images[i:i + MEMORY_BATCH]), color="rgb")
            chunks.append(teacher.image_states(torch.from_numpy(pixels)).float())
            if i == 0 and memory_bytes(len(images), chunks[0].shape[1:]) > MAX_MEMORY_BYTES:
                need = memory_bytes(len(images), chunks[0].shape[1:]) / 2**30
                raise InputError(f"the encoder states of {len(images)} images need {need:.1f} GiB; give fewer "
                                 f"images (at most {MAX_MEMORY_BYTES >> 30} GiB of states are kept for training).")
    return torch.cat(chunks)


def caption_speed(teacher: Captioner, student: Captioner, images: Sequence[Any]) -> dict[str, Any]:
    """Median ms of one greedy caption of ``SPEED_TOKENS`` tokens (batch 1), teacher vs student, alternating."""
    image = [images[0]]

    def run(model: Captioner) -> None:
        model.caption(image, color="rgb", num_beams=1, max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS)

    times = interleaved({"teacher": partial(run, teacher), "student": partial(run, student)}, warmup=1,
                        min_time=SPEED_SECONDS, min_iters=11)
    ms = {k: float(np.median(v)) for k, v in times.items()}
    return {"tokens": SPEED_TOKENS, "batch": 1, "teacher_caption_ms": ms["teacher"], "student_caption_ms": ms["student"],
            "teacher_token_ms": ms["teacher"] / SPEED_TOKENS, "student_token_ms": ms["student"] / SPEED_TOKENS,
            "speedup": ms["teacher"] / ms["student"]}


def _sizes(src: Bundle, staged: Path) -> dict[str, Any]:
    out = {}
    for role, g in src.manifest.graphs.items():
        out[role] = {"teacher": src.graph_path(role).stat().st_size, "student": (staged / g.file).stat().st_size}
    out["decoder_ratio"] = out[CAPTION_DECODER]["student"] / out[CAPTION_DECODER]["teacher"]
    return out


def caption_distill_summary(info: dict[str, Any]) -> str:
    """Printable lines: training, the gate, speed and size."""
    s, z = info["speed"], info["size_bytes"]
    lines = [
        f"student: {info['student']['layers']} of the teacher's {info['student']['teacher_layers']} decoder layers "
        f"(kept {info['student']['kept']})",
        info["training"]["summary"],
        caption_gate_summary(info["gate"]).rsplit("\n", 1)[0],
        f"one caption of {s['tokens']} tokens, batch 1: teacher {s['teacher_caption_ms']:.1f} ms, student "
        f"{s['student_caption_ms']:.1f} ms ({s['speedup']:.2f}x; {s['teacher_token_ms']:.2f} -> "
        f"{s['student_token_ms']:.2f} ms per token)",
        f"decoder graph: {z[CAPTION_DECODER]['teacher'] / 1e6:.1f} MB -> {z[CAPTION_DECODER]['student'] / 1e6:.1f} MB",
        "distillation gate: PASSED" if info["passed"] else
        "distillation gate: FAILED (" + "; ".join(info["failures"]) + ")",
    ]
    return "\n".join(lines)


def parse_decoder_student(spec: str | None, teacher_layers: int) -> int | list[int]:
    """``layers=N`` or ``layers=I,J`` (``None``: ``DEFAULT_DECODER_LAYERS``, or half the teacher's layers)."""
    if spec is None:
        return DEFAULT_DECODER_LAYERS if teacher_layers == 4 else max(1, teacher_layers // 2)
    key, _, value = spec.partition("=")
    if key.strip() != "layers" or not value.strip():
        raise InputError(f"--student {spec!r}: a decoder student is layers=N (teacher layers kept, spread evenly) "
                         "or layers=I,J,... (0-based teacher layers, increasing).")
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        raise InputError(f"--student {spec!r}: layers must be integers, e.g. layers=2 or layers=0,3.") from None
    return numbers[0] if len(numbers) == 1 and "," not in value else numbers


def distill_captioner(
    source: str | Path,
    out_dir: str | Path,
    *,
    student: str | None = None,
    images: Any = None,
    options: Any = None,
    thresholds: CaptionGateThresholds = CaptionGateThresholds(),
    accept_degradation: bool = False,
    checkpoint_dir: str | Path | None = None,
    restart: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    text_model: Any = None,
    gate_images: Sequence[Any] | None = None,
    synthetic: int = PSEUDO_IMAGES,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Distil a captioner bundle's decoder into one with fewer layers, and write it as a gated bundle.

    Args:
        source: The teacher: an fp32 captioner bundle (the built-in one, or exported from a folder).
        out_dir: Bundle directory to create.
        student: ``layers=N`` or ``layers=I,J,...``; ``None``: ``DEFAULT_DECODER_LAYERS`` of the
            built-in captioner's 4, half the layers of another teacher.
        images: A folder (or list) of unlabelled images to caption and train on; ``None``: packaged images
            the gate never sees.
        options: ``edgemm.export.distill_caption.CaptionDistillOptions`` (``None``: its defaults).
        thresholds: The caption gate.
        accept_degradation: Write the student even when it fails the gate (recorded).
        checkpoint_dir: Training checkpoints (default ``<out_dir>.distill``); one there is resumed.
        restart: Discard an existing checkpoint instead of resuming it.
        overwrite: Replace an existing bundle.
        threads: Threads for training and ONNX Runtime.
        text_model: A dual encoder that embeds captions for the similarity figure (None: not measured).
        gate_images: Held-out images for the gate (default: the accuracy gate's, plus the user's held-out ones).
        synthetic: Simulated inputs to caption and train on besides the images, where the teacher's image
            side allows them (the built-in captioner's pseudo images); 0: none.
        progress: ``progress(stage, done, total, metrics)``; stage ``"train"`` (steps) or ``"step"``
            (a description in ``metrics["message"]``).

    Returns:
        (the written manifest, the report).

    Raises:
        InputError: A bad student spec or images, an existing output.
        BundleError: The source cannot be distilled (see :func:`caption_teacher`).
        VerificationError: The exported student drifts from its PyTorch reference.
        CaptionDistillGateError: The student's captions changed beyond the gate, degradation not accepted.
    """
    import torch

    from edgemm.export import distill_caption as dc
    from edgemm.export.distill import CHECKPOINT_NAME
    from edgemm.export.models.captioner import build_captioner_bundle

    report_to = progress or (lambda *_args: None)

    def step(message: str) -> None:
        report_to("step", 0, 0, {"message": message})

    options = options or dc.CaptionDistillOptions(threads=threads)
    started = time.perf_counter()
    src = Bundle(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"'{out_dir}' already exists; choose another path or pass --force.")
    step("rebuilding the teacher and checking it against the bundle")
    teacher = caption_teacher(src)
    layers = parse_decoder_student(student, dc.decoder_layers(teacher.lm))
    kept = dc.selected_layers(layers, dc.decoder_layers(teacher.lm))  # a bad spec fails here, before any work
    pupil = dc.decoder_student(teacher.lm, kept)
    runtime = Captioner(src, threads=threads)
    checked = _check_teacher(teacher, runtime)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(out_dir.name + ".distill")
    if restart and folder.exists():
        shutil.rmtree(folder)
    resume = (folder / CHECKPOINT_NAME).is_file()
    train_images, user_held, described = training_images(images)
    step(f"captioning {len(train_images)} unlabelled images with the teacher bundle")
    captions = runtime.caption(list(train_images), color="rgb", batch_size=16)
    step("computing their encoder states with the teacher's image side")
    memory, tokens = _memory(teacher, runtime, train_images), [list(c.token_ids) for c in captions]
    if teacher.synthetic is not None and synthetic:
        step(f"captioning {synthetic} {teacher.synthetic_description}")
        extra = teacher.synthetic(synthetic, train_images)
        captions_of = runtime_captions(runtime, teacher.parts(teacher.lm).decoder, extra)
        memory, tokens = torch.cat([memory, extra]), tokens + captions_of
        described += f", and {synthetic} {teacher.synthetic_description}"
    data = dc.CaptionSet(memory, tokens)
    train_set, held_set = dc.split_captions(data, options.held_out_fraction, options.seed)
    g = src.manifest.generation
    step(f"{'resuming' if resume else 'distilling'} the decoder student on {len(train_set)} captions")
    pupil, training = dc.distill_decoder(
        teacher.lm, pupil, train_set, held_set, pad_id=g.pad_id, prompt_length=len(g.start_ids), options=options,
        checkpoint_dir=folder, resume=resume,
        progress=lambda epoch, done, total, metrics: report_to("train", done, total, {"epoch": epoch, **metrics}))
    if gate_images is None:
        gate_images, gate_described = caption_gate_images()
    else:
        gate_images, gate_described = list(gate_images), f"{len(gate_images)} images given"
    gate_images = gate_images + list(user_held)
    if user_held:
        gate_described += f", {len(user_held)} of your held-out images"
    step(f"captioning {len(gate_images)} held-out images with the teacher")
    reference = runtime.caption(gate_images, color="rgb", batch_size=16)
    info: dict[str, Any] = {}

    def gate(staged: Path) -> dict[str, Any]:
        step("captioning the held-out images with the student")
        candidate = Captioner(Bundle(staged, check_hashes=False), threads=threads)
        report = compare_captions(reference, candidate.caption(gate_images, color="rgb", batch_size=16),
                                  prompt_length=len(g.start_ids), text_model=text_model, thresholds=thresholds,
                                  images=gate_described)
        step("timing one caption of teacher and student")
        speed = caption_speed(runtime, candidate, gate_images)
        info.update({
            "tower": "decoder", "teacher": teacher.description, "teacher_check": checked,
            "student": {"layers": len(kept), "kept": kept, "teacher_layers": dc.decoder_layers(teacher.lm)},
            "data": {"images": described, "train": len(train_set), "held_out": len(held_set)},
            "training": {**training.to_dict(), "summary": training.summary()},
            "thresholds": asdict(thresholds), "gate": report, "speed": speed, "size_bytes": _sizes(src, staged),
            "failures": report["failures"], "passed": report["passed"],
            "seconds": round(time.perf_counter() - started, 1),
        })
        if not report["passed"]:
            if not accept_degradation:
                raise CaptionDistillGateError(
                    f"the decoder student changes the captions beyond the gate: {'; '.join(report['failures'])}. "
                    f"Nothing was written; the training checkpoint stays in '{folder}'. Keep more layers "
                    f"(--student layers=N), train longer (--epochs) or on more images (--images), or pass "
                    f"--accept-degradation to write it anyway.\n{caption_distill_summary(info)}", info)
            info["accepted_degradation"] = True
        return {"distillation": info}

    parts = teacher.parts(pupil)
    parts.name = src.manifest.name
    parts.source = {**src.manifest.source, "distilled_from": {
        "path": str(src.path), "name": src.manifest.name, "created": src.manifest.created, "tower": "decoder",
        "student": {"layers": kept}, "teacher": teacher.description}}
    step("exporting and verifying the student captioner")
    written = build_captioner_bundle(parts, out_dir, overwrite=overwrite,
                                     progress=lambda message: step(message), before_commit=gate)
    shutil.rmtree(folder, ignore_errors=True)
    return written, info

