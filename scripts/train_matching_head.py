#!/usr/bin/env python
"""Rebuild the built-in matching head's committed weights from the packaged emoji, and report them.

Writes ``export/models/data/matching_head.npz`` (float16 weights + held-out
record) and ``benchmarks/results/matching-head.md``. About a minute once the
feature cache exists (first run: about two more, computing features for
~1,240 emoji images and their captions). Deterministic for a given machine.

Usage:
    python scripts/train_matching_head.py [--cache ~/.cache/edgemm/fusion-study] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from edgemm.export.models.matching import WEIGHTS, save_matching_head, train_matching_head

ROOT = Path(__file__).resolve().parents[1]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(record: dict) -> str:
    head, base = record["held_out"], record["cosine_baseline"]
    k = head["rerank_k"]
    rows = [("dual encoder cosine", base), ("matching head (early fusion + pooled patches)", head)]
    lines = [
        "## The built-in matching head (`edgemm.load(default=\"matching\")`)",
        "",
        f"Held-out emoji (test split: {record['split']['test']} images never seen in training; "
        f"{record['test_pairs']} pairs, each image with its own name and its hardest-permutation wrong name). "
        f"Captions `{record['prompt']}`; threshold {record['threshold']:.3f} (probability) picked on the "
        f"validation split. Weights as committed (float16).",
        "",
        f"| scorer | pair accuracy | rank-all R@1 | rank-all R@5 | rerank top-{k} R@1 | rerank top-{k} R@5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(f"| {name} | {pct(m['pair_accuracy'])} | {pct(m['rank_all']['r1'])} | {pct(m['rank_all']['r5'])}"
                     f" | {pct(m['rerank']['r1'])} | {pct(m['rerank']['r5'])} |")
    s = record["search"]
    lines += [
        "",
        f"Search (the direction `index.search(..., rerank={s['rerank_k']})` serves): each test name queries the "
        f"{record['split']['test']} test images. The reranker scores the cosine's top {s['rerank_k']} by head logit + "
        f"{s['cosine_weight']:g} × cosine (the weight picked on the validation split; the head alone is shown too).",
        "",
        "| search | R@1 | R@5 | R@10 |",
        "|---|---:|---:|---:|",
    ]
    for name, key in (("cosine (vector search)", "cosine"), (f"head alone, rerank top {s['rerank_k']}", "head_rerank"),
                      (f"head + cosine, rerank top {s['rerank_k']} (shipped)", "mixed_rerank")):
        lines.append(f"| {name} | {pct(s[key]['r1'])} | {pct(s[key]['r5'])} | {pct(s[key]['r10'])} |")
    t = record["training"]
    lines += [
        "",
        f"Rank all: the head scores every test name for each test image. Rerank: it reorders the cosine's top {k} "
        f"(the true name is in that shortlist {pct(base['rerank']['shortlist_recall'])} of the time). Training: "
        f"{record['training_pairs']} pairs ({record['negatives_per_image']['hard']} hard + "
        f"{record['negatives_per_image']['random']} random wrong names per image), {t['epochs_run']} epochs "
        f"(best {t['best_epoch']}), {t['seconds']:.0f} s. Reproduce: `python scripts/train_matching_head.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgemm" / "fusion-study"),
                        help="tower-feature cache folder (shared with benchmarks/fusion_study.py)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=str(WEIGHTS), help="where to write the weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    head, record = train_matching_head(args.cache, progress=lambda stage, done, total: print(
        f"  {stage} {done}/{total}", flush=True) if done == total or stage == "train" else None)
    save_matching_head(head, record, args.out)
    text = markdown(record)
    (ROOT / "benchmarks" / "results" / "matching-head.md").write_text(text)
    print("\n" + text + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
