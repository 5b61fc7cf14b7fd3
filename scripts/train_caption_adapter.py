#!/usr/bin/env python
"""Rebuild the default captioner's committed adapter from packaged data, and pick its decoding settings.

Writes ``export/models/data/caption_adapter.npz`` (float16 weights + record) and
``caption_adapter.json`` beside it. The first run computes default-tower
features of the emoji, Fashion-MNIST and sample photos into the cache (a few
minutes); training itself took 34 minutes on one thread (2,400 steps). Deterministic
for a given seed and machine.

Usage:
    python scripts/train_caption_adapter.py [--cache ~/.cache/edgemm/captioner] [--threads 1] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from edgemm.export.models.default_captioner import (WEIGHTS, AdapterConfig, TrainOptions,  # noqa: E402
                                                    caption_data, choose_generation, save_caption_weights,
                                                    train_caption_adapter)
from edgemm.export.models.dual_encoder import default_towers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgemm" / "captioner"),
                        help="tower-feature cache folder (shared with benchmarks/captioner_study.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--steps", type=int, default=TrainOptions.steps, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=TrainOptions.seed)
    parser.add_argument("--lora-rank", type=int, default=AdapterConfig.lora_rank,
                        help="low-rank update of the decoder's cross-attention (0: frozen decoder)")
    parser.add_argument("--out", default=str(WEIGHTS), help="where to write the weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = TrainOptions()
    options = replace(base, steps=args.steps, seed=args.seed,
                      config=replace(base.config, lora_rank=args.lora_rank))
    started = time.time()

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("val") or done == total or (stage == "train" and done % 50 == 0):
            print(f"  [{time.time() - started:6.0f} s] {stage} {done}/{total}", flush=True)

    towers = default_towers()
    data = caption_data(args.cache, towers, progress)
    arrays, record = train_caption_adapter(args.cache, options, progress=progress, data=data, towers=towers)
    settings, rows = choose_generation(arrays, record, data)
    record["generation"] = asdict(settings)
    record["generation_sweep"] = {"set": "validation", "rows": rows}
    path = save_caption_weights(arrays, record, args.out)
    for r in rows:
        print(f"  {r['settings']}: CIDEr-D {r['cider_d']:.3f} BLEU-1 {r['bleu1']:.3f} exact {r['exact_match']:.3f}")
    print(f"chose {settings}; wrote {path} ({path.stat().st_size} bytes) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
