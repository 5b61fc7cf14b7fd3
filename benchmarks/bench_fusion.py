"""Image–text matching latency: edgemm (ONNX Runtime) vs the PyTorch reference, in the same run.

The built-in matching model (default towers + the early-fusion head over both
embeddings and the mean patch token). Held-out emoji (the test split, never
trained on) are the images; their captions the texts.

* **pair**: ``model.match(frame, text)`` for one BGR uint8 image and one
  text: image preprocessing, the image graph (embedding + 7x7 patch tokens),
  tokenizing and the text graph, the fusion head, the sigmoid. PyTorch eager:
  BGR->RGB, the reference PIL preprocessing (``reference_pixels``), the torch
  image tower with its patch grid, the torch tokenizer and text tower, the head.
* **rerank 50**: one text query over an index of 51 emoji PNG files:
  ``index.search(query, k=5, rerank=50, reranker=model.reranker([text]))``,
  which embeds the query, takes the 50 nearest by cosine, re-reads those 50
  files (the head needs their patch tokens; the index keeps embeddings only),
  runs the image graph on them (batches of 32) and the head on the 50 pairs,
  and orders them by head logit + w × cosine. PyTorch: the same steps with
  the torch towers and head (PIL file decode, ``reference_pixels``, numpy
  cosine top-50).
* **head only, 50 pairs**: the fusion graph alone on 50 precomputed feature
  rows vs the torch head.

Both sides run in alternating blocks (``_common.interleaved_rounds``) so load
from other processes falls on both alike; speed-ups are ratios from the same
run. The script fails (exit 1) if the two disagree: the pair's probability by
more than 0.02, or the reranked top-1.

Usage:
    python benchmarks/bench_fusion.py [--bundle /tmp/b/matching] [--threads 2] [--rounds 10 --block 3]
                                      [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

import edgemm
from edgemm._index import VectorIndex
from edgemm.export.models.dual_encoder import TokenImageTower, default_towers, reference_pixels
from edgemm.export.models.matching import PROMPT, build_matching_bundle, load_matching_head, split_rows
from edgemm.runtime.datasets import emoji

from _common import (  # shared helpers beside this script
    Sample,
    device_info,
    interleaved_rounds,
    limit_native_threads,
    percentiles,
    print_device,
    write_json,
)

DEFAULT_BUNDLE = "/tmp/b/matching"
CANDIDATES = 51  # index size: the 50 reranked plus one the search leaves out
RERANK = 50
IMAGE_BATCH = 32  # images per graph call, as the SDK's reranker


class TorchMatcher:
    """The matching pipeline in PyTorch eager: towers from packaged weights, the committed head."""

    def __init__(self) -> None:
        tower, self.text, _ = default_towers()
        self.image = TokenImageTower(tower).eval()
        self.head, record = load_matching_head()
        self.weight = record["search"]["cosine_weight"]

    @torch.inference_mode()
    def image_features(self, rgb: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, tokens = [], []
        for i in range(0, len(rgb), IMAGE_BATCH):
            e, _, t = self.image(torch.from_numpy(reference_pixels(rgb[i : i + IMAGE_BATCH])))
            embeddings.append(e)
            tokens.append(t)
        return torch.cat(embeddings), torch.cat(tokens)

    @torch.inference_mode()
    def match(self, frame_bgr: np.ndarray, text: str) -> float:
        embedding, tokens = self.image_features([cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)])
        logit = self.head(embedding, tokens, self.text([text]))
        return float(torch.sigmoid(logit)[0, 0])

    @torch.inference_mode()
    def search_rerank(self, vectors: np.ndarray, paths: list[Path], text: str, k: int) -> list[int]:
        query = self.text([text])
        cosine = vectors @ query[0].numpy()
        shortlist = np.argsort(-cosine, kind="stable")[:RERANK]
        rgb = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in shortlist]
        embedding, tokens = self.image_features(rgb)
        logits = self.head(embedding, tokens, query.expand(len(shortlist), -1))[:, 0].numpy()
        order = np.argsort(-(logits + self.weight * cosine[shortlist]), kind="stable")
        return [int(shortlist[j]) for j in order[:k]]


def timed_side(fn) -> Sample:
    t0 = time.perf_counter()
    fn()
    return {"total": (time.perf_counter() - t0) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help="matching bundle (built there if missing)")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, torch and native pools")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per measurement")
    parser.add_argument("--block", type=int, default=3, help="calls per side per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side first")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    parser.add_argument("--markdown", dest="markdown_path", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = device_info(args.threads)
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"building the matching bundle at {args.bundle}", flush=True)
        build_matching_bundle(args.bundle)
    model = edgemm.load(args.bundle, providers=("cpu",), threads=args.threads)
    reference = TorchMatcher()
    info["native_pools"] = limit_native_threads(args.threads)

    pairs = emoji()
    test = [pairs[i] for i in split_rows(len(pairs))["test"][:CANDIDATES]]
    frame = np.ascontiguousarray(cv2.cvtColor(test[0][1], cv2.COLOR_RGB2BGR))
    text = PROMPT.format(test[0][0])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (_, rgb) in enumerate(test):
            paths.append(Path(tmp) / f"{i:03d}.png")
            Image.fromarray(rgb).save(paths[-1])
        vectors = model.embed_images([str(p) for p in paths])
        index = VectorIndex(model.dim)
        index.add(vectors, ids=[str(i) for i in range(len(paths))], metadata=[{"path": str(p)} for p in paths])

        def edgemm_rerank() -> list[int]:
            q = model.embed_texts([text])
            hits = index.search(q, k=5, rerank=RERANK, reranker=model.reranker([text]))[0]
            return [int(h.id) for h in hits]

        # Correctness first: a fast pipeline that answers differently is not a speed-up.
        p_ours, p_ref = model.match(frame, text), reference.match(frame, text)
        top_ours, top_ref = edgemm_rerank(), reference.search_rerank(vectors, paths, text, 5)
        agree = {"pair_probability": [p_ours, p_ref], "rerank_top5": [top_ours, top_ref]}
        print(f"pair probability: edgemm {p_ours:.4f}, PyTorch {p_ref:.4f}; reranked top-5: edgemm {top_ours}, "
              f"PyTorch {top_ref}", flush=True)
        if abs(p_ours - p_ref) > 0.02 or top_ours[0] != top_ref[0]:
            print("error: edgemm and PyTorch disagree", file=sys.stderr)
            return 1

        image_features = model._run_images([frame] * RERANK, "bgr", IMAGE_BATCH)
        text_features = model.text_features([text])
        rows_i, rows_t = np.arange(RERANK), np.zeros(RERANK, np.intp)
        with torch.inference_mode():
            e, t = reference.image_features([test[0][1]] * RERANK)
            q = reference.text([text]).expand(RERANK, -1)
        cases = {
            "pair": (lambda: model.match(frame, text), lambda: reference.match(frame, text)),
            "rerank 50": (edgemm_rerank, lambda: reference.search_rerank(vectors, paths, text, 5)),
            "head only, 50 pairs": (lambda: model._fuse(image_features, text_features, rows_i, rows_t, 64),
                                    lambda: reference.head(e, t, q)),
        }
        for name, (ours, theirs) in cases.items():
            with torch.inference_mode():
                samples, per_round = interleaved_rounds(
                    {"edgemm": lambda f=ours: timed_side(f), "torch": lambda f=theirs: timed_side(f)},
                    rounds=args.rounds, block=args.block, warmup=args.warmup)
            results[name] = {side: percentiles([s["total"] for s in samples[side]]) for side in samples}
            results[name]["per_round_speedup"] = percentiles([r["torch"] / r["edgemm"] for r in per_round],
                                                             (10, 50, 90))
            print(f"{name}: edgemm p50 {results[name]['edgemm']['p50']:.2f} ms, PyTorch p50 "
                  f"{results[name]['torch']['p50']:.2f} ms", flush=True)

    print()
    print_device(info)
    lines = ["| case | edgemm p50 | p90 | PyTorch p50 | p90 | speed-up (p50) | per-round speed-up p10–p90 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s = r["per_round_speedup"]
        lines.append(f"| {name} | {r['edgemm']['p50']:.2f} ms | {r['edgemm']['p90']:.2f} ms | "
                     f"{r['torch']['p50']:.2f} ms | {r['torch']['p90']:.2f} ms | "
                     f"{r['torch']['p50'] / r['edgemm']['p50']:.2f}× | {s['p10']:.2f}–{s['p90']:.2f}× |")
    table = "\n".join(lines)
    print(table)
    if args.markdown_path:
        with open(args.markdown_path, "w") as fh:
            fh.write(f"## Matching latency: edgemm vs PyTorch ({info['cpu_model']}, {args.threads} threads, "
                     f"load avg at start {info['loadavg_1m']})\n\n{table}\n\nReproduce: "
                     f"`python benchmarks/bench_fusion.py --threads {args.threads}`.\n")
        print(f"\nwrote {args.markdown_path}")
    if args.json_path:
        write_json(args.json_path, {"device": info, "agreement": agree, "results": results,
                                    "rounds": args.rounds, "block": args.block})
    return 0


if __name__ == "__main__":
    sys.exit(main())
