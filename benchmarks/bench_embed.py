"""Embedding throughput: edgemm (ONNX Runtime) vs the PyTorch reference, images and texts.

* Images: ``model.embed_images(frames, batch_size=32)`` on one batch of 32
  1920x1080 BGR frames made from the 15 real sample photos (cycled), end to
  end (preprocessing included), vs BGR->RGB + ``reference_pixels`` (PIL) + the
  torch image tower on the same frames. Inference-only rates are shown too.
* Texts: ``model.embed_texts(texts, batch_size=64)`` on real text, half
  ``SAMPLE_SENTENCES`` and half the bundle's default labels (ImageNet class
  names), vs the Hugging Face tokenizer + torch text tower. The reference gets
  the same length-sorted batches of 64 that edgemm makes, so the ratio compares
  runtimes, not batching.

Both sides run in alternating rounds in one process with the same thread
count; throughput is items / median seconds per call. The script fails
(exit 1) if the embeddings of the two sides disagree (text cosine < 0.99,
image cosine < 0.9: the image sides use different resizers).

Usage:
    python benchmarks/bench_embed.py [--bundle /tmp/b/default] [--threads 2]
                                     [--texts 512] [--rounds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

import edgemm
from edgemm.export.models.dual_encoder import default_towers, reference_pixels
from edgemm.runtime.datasets import SAMPLE_SENTENCES, sample_photos

from _common import (  # shared helpers beside this script
    DEFAULT_BUNDLE,
    Sample,
    device_info,
    frame_from_photo,
    interleaved_rounds,
    limit_native_threads,
    percentiles,
    print_device,
    stage,
    target_line,
    write_json,
)

IMAGE_BATCH = 32
TEXT_BATCH = 64
TARGET_IMAGES_PER_S = 100.0  # from the issue, at batch 32
# Same graph weights, so texts must match closely. Images go through different resizers
# (edgemm's cv2 approximation vs PIL's antialiased bilinear), which alone moves the top-10
# ConSE embedding of textured frames to ~0.94 cosine; only a gross error falls below 0.9.
MIN_TEXT_COSINE = 0.99
MIN_IMAGE_COSINE = 0.9


def text_corpus(sentences: Sequence[str], class_names: Sequence[str], n: int) -> list[str]:
    """``n`` real texts: sample sentences and class names alternating, names spread over all classes."""
    k = n // 2 + 1
    names = [class_names[(i * len(class_names)) // k] for i in range(k)]
    return [sentences[(i // 2) % len(sentences)] if i % 2 == 0 else names[i // 2] for i in range(n)]


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Index batches as edgemm's ``embed_texts`` forms them (sorted by character length)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between matching rows."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help="edgemm bundle directory")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, torch and native pools")
    parser.add_argument("--texts", type=int, default=512, help="texts per embed_texts call (batches of 64)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per modality")
    parser.add_argument("--block", type=int, default=1, help="calls per side per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = device_info(args.threads)
    model = edgemm.load(args.bundle, providers=("cpu",), threads=args.threads)
    image_tower, text_embedder, _ = default_towers()
    info["native_pools"] = limit_native_threads(args.threads)

    photos = sample_photos()
    frames = [frame_from_photo(photos[i % len(photos)].image) for i in range(IMAGE_BATCH)]
    texts = text_corpus(SAMPLE_SENTENCES, model.default_labels, args.texts)
    batches = length_sorted_batches(texts, TEXT_BATCH)

    def torch_images() -> tuple[np.ndarray, Sample]:
        t0 = time.perf_counter()
        pixels = reference_pixels([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])
        t1 = time.perf_counter()
        with torch.inference_mode():
            embedding, _ = image_tower(torch.from_numpy(pixels))
        t2 = time.perf_counter()
        return embedding.numpy(), {"total": (t2 - t0) * 1e3, "inference": (t2 - t1) * 1e3}

    def edgemm_images() -> tuple[np.ndarray, Sample]:
        t0 = time.perf_counter()
        out = model.embed_images(frames, batch_size=IMAGE_BATCH)
        total = (time.perf_counter() - t0) * 1e3
        return out, {"total": total, "inference": model.image_backend.last_inference_ms}

    def torch_texts() -> tuple[np.ndarray, Sample]:
        out = np.empty((len(texts), model.dim), np.float32)
        t0 = time.perf_counter()
        inference = 0.0
        with torch.inference_mode():
            for idx in batches:
                feeds = text_embedder.feeds([texts[i] for i in idx])
                t1 = time.perf_counter()
                ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
                emb = text_embedder.tower(ids, mask)
                inference += time.perf_counter() - t1
                out[idx] = emb.numpy()
        return out, {"total": (time.perf_counter() - t0) * 1e3, "inference": inference * 1e3}

    backend = model.text_backend
    infer = backend.infer
    inference_ms = [0.0]

    def counting_infer(feeds: Any) -> Any:
        # Sums the graph time over embed_texts' batches; wraps, does not change, the backend call.
        out = infer(feeds)
        inference_ms[0] += backend.last_inference_ms
        return out

    backend.infer = counting_infer  # instance attribute on our own model object only

    def edgemm_texts() -> tuple[np.ndarray, Sample]:
        inference_ms[0] = 0.0
        t0 = time.perf_counter()
        out = model.embed_texts(texts, batch_size=TEXT_BATCH)
        return out, {"total": (time.perf_counter() - t0) * 1e3, "inference": inference_ms[0]}

    # Agreement first, on the exact inputs that get timed.
    image_cos = row_cosines(edgemm_images()[0], torch_images()[0])
    text_cos = row_cosines(edgemm_texts()[0], torch_texts()[0])
    agreement = {"image_min_cosine": float(image_cos.min()), "image_mean_cosine": float(image_cos.mean()),
                 "text_min_cosine": float(text_cos.min()), "text_mean_cosine": float(text_cos.mean())}

    def only_timings(fn: Callable[[], tuple[np.ndarray, Sample]]) -> Callable[[], Sample]:
        return lambda: fn()[1]

    image_samples, image_rounds = interleaved_rounds(
        {"edgemm": only_timings(edgemm_images), "torch": only_timings(torch_images)},
        rounds=args.rounds, block=args.block, warmup=args.warmup)
    text_samples, text_rounds = interleaved_rounds(
        {"edgemm": only_timings(edgemm_texts), "torch": only_timings(torch_texts)},
        rounds=args.rounds, block=args.block, warmup=args.warmup)
    info["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    rows: list[dict[str, Any]] = []
    for what, unit, count, samples, per_round in (
        ("images, 1080p BGR frames, batch 32", "images/s", IMAGE_BATCH, image_samples, image_rounds),
        ("texts, sentences + class names, batch 64", "sentences/s", len(texts), text_samples, text_rounds),
    ):
        row: dict[str, Any] = {"what": what, "unit": unit, "items_per_call": count}
        for side in ("edgemm", "torch"):
            total = percentiles(stage(samples[side], "total"), (50,))["p50"]
            inference = percentiles(stage(samples[side], "inference"), (50,))["p50"]
            row[side] = {"median_call_ms": total, "per_s": count / total * 1e3,
                         "inference_ms": inference, "inference_per_s": count / inference * 1e3,
                         "calls": len(samples[side])}
        row["speedup"] = row["edgemm"]["per_s"] / row["torch"]["per_s"]
        row["speedup_inference"] = row["edgemm"]["inference_per_s"] / row["torch"]["inference_per_s"]
        ratios = [r["torch"] / r["edgemm"] for r in per_round]
        row["per_round_speedup"] = {"min": min(ratios), "max": max(ratios)}
        rows.append(row)

    print_device(info)
    print(f"images: {IMAGE_BATCH} frames = the {len(photos)} sample photos cycled, each centre-cropped to 16:9 and "
          f"resized to 1920x1080; texts: {len(texts)} = {len(texts) - len(texts) // 2} sample sentences "
          f"({len(SAMPLE_SENTENCES)} distinct, repeated) alternating with {len(texts) // 2} class names, "
          f"length-sorted batches of {TEXT_BATCH} on both sides")
    print(f"timing: {args.warmup} warm-up call(s) per side, then {args.rounds} rounds x {args.block} call(s) per side, "
          f"alternating order; medians; load avg at end={info['loadavg_1m_end']}\n")
    print("| workload | edgemm /s | PyTorch /s | speed-up | edgemm graph-only /s | PyTorch graph-only /s "
          "| graph speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, t = r["edgemm"], r["torch"]
        print(f"| {r['what']} ({r['unit']}) | {e['per_s']:.1f} | {t['per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{e['inference_per_s']:.1f} | {t['inference_per_s']:.1f} | {r['speedup_inference']:.2f}x |")
    print("\nend to end includes preprocessing (images) and tokenization (texts); graph-only divides by the time "
          "inside the image/text graph calls alone.")
    for r in rows:
        print(f"{r['what']}: median call edgemm {r['edgemm']['median_call_ms']:.0f} ms, PyTorch "
              f"{r['torch']['median_call_ms']:.0f} ms; per-round speed-up {r['per_round_speedup']['min']:.2f}x to "
              f"{r['per_round_speedup']['max']:.2f}x")
    print(f"agreement with PyTorch (cosine min / mean): images {agreement['image_min_cosine']:.4f} / "
          f"{agreement['image_mean_cosine']:.4f} (different resizers, see MIN_IMAGE_COSINE), "
          f"texts {agreement['text_min_cosine']:.5f} / {agreement['text_mean_cosine']:.5f}")
    img = rows[0]["edgemm"]["per_s"]
    print(target_line(">= 100 images/s at batch 32", img >= TARGET_IMAGES_PER_S, f"{img:.1f} images/s end to end"))

    if args.json_path:
        write_json(args.json_path, {"benchmark": "embed", "device": info, "texts": len(texts),
                                    "rounds": args.rounds, "block": args.block, "results": rows,
                                    "agreement": agreement, "targets": {"images_per_s": TARGET_IMAGES_PER_S}})
    if agreement["image_min_cosine"] < MIN_IMAGE_COSINE or agreement["text_min_cosine"] < MIN_TEXT_COSINE:
        print(f"error: embeddings disagree with PyTorch beyond resizer differences: {agreement}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
