"""ONNX Runtime thread-pool spinning, on and off, for calls that run several graphs in a row.

ONNX Runtime's intra-op threads spin for a while after each run
(``session.intra_op.allow_spinning``, on by default). A call that runs several
sessions back to back (``match``: image graph with patch tokens, text graph,
fusion head) can then have one session's idle threads spinning while the next
session needs the cores. This times the matching model's three graphs in
sequence and the image graph alone, with spinning on and off, in alternating
rounds (same inputs, same threads).

Usage:
    python benchmarks/bench_spinning.py [--bundle /tmp/b/matching] [--threads 2] [--rounds 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

import edgemm
from edgemm.export.models.matching import PROMPT, build_matching_bundle
from edgemm.runtime.datasets import emoji

from _common import device_info, print_device  # shared helpers beside this script

ROLES = ("image_encoder", "text_encoder", "fusion")


def sessions(model, threads: int, spin: bool) -> dict[str, ort.InferenceSession]:
    out = {}
    for role in ROLES:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        out[role] = ort.InferenceSession(str(model.bundle.graph_path(role)), options,
                                         providers=["CPUExecutionProvider"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="/tmp/b/matching", help="matching bundle (built there if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds of 5 calls per setting")
    args = parser.parse_args(argv)
    info = device_info(args.threads)
    if not (Path(args.bundle) / "manifest.json").is_file():
        build_matching_bundle(args.bundle)
    model = edgemm.load(args.bundle, threads=args.threads)
    name, rgb = emoji()[0]
    pixels = model.preprocess([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)])
    tokens = model.tokenizer([PROMPT.format(name)])
    text_feeds = {k: tokens[k] for k in model._text_inputs}
    image = model.image_backend.infer({"pixels": pixels})
    text = model.text_backend.infer(text_feeds)
    fusion_feeds = {"image_embedding": image["embedding"], "image_tokens": image["image_tokens"],
                    "text_embedding": text["embedding"]}
    feeds = {"image_encoder": {"pixels": pixels}, "text_encoder": text_feeds, "fusion": fusion_feeds}
    settings = {"spinning on (default)": sessions(model, args.threads, True),
                "spinning off": sessions(model, args.threads, False)}
    cases = {"3 graphs in a row (a match call)": ROLES, "image graph alone": ("image_encoder",)}
    rows = []
    for case, roles in cases.items():
        times: dict[str, list[float]] = {k: [] for k in settings}
        for s in settings.values():
            for _ in range(5):
                for role in roles:
                    s[role].run(None, feeds[role])
        for r in range(args.rounds):
            for key in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                for _ in range(5):
                    t0 = time.perf_counter()
                    for role in roles:
                        settings[key][role].run(None, feeds[role])
                    times[key].append((time.perf_counter() - t0) * 1e3)
        rows.append((case, {k: (float(np.median(v)), float(np.percentile(v, 90))) for k, v in times.items()}))
    print_device(info)
    print("| case | " + " | ".join(f"{k} p50 (p90)" for k in settings) + " |")
    print("|---|" + "---:|" * len(settings))
    for case, values in rows:
        print(f"| {case} | " + " | ".join(f"{p50:.2f} ms ({p90:.2f})" for p50, p90 in values.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
