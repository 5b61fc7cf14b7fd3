"""Captioning latency: edgemm (ONNX Runtime + numpy generation loop) vs transformers generate(), same run.

Both sides caption the same preprocessed sample photos with greedy decoding
and exactly ``--new-tokens`` new tokens (``min_new_tokens = max_new_tokens``,
so an early end token cannot flatter either side):

* **edgemm**: the image graph once per image (cross-attention keys/values of
  every layer), then the decoder-step graph once per token with the KV cache,
  then detokenization with the bundle's ``tokenizer.json``; each stage timed;
* **PyTorch**: ``generate()`` in eager mode on the folder's own model (its
  dynamic cache), and the folder's tokenizer's ``batch_decode``.

The sides run in alternating blocks (``_common.interleaved_rounds``); the
speed-up is the ratio of medians from the same run. The script also records
the decoder step time as the caption grows (flat when the cache works) and the
peak resident memory of a process that loads each side and captions one photo.
It fails (exit 1) if the two sides' tokens differ.

A users'-folder captioner of realistic size (random weights: timing does not
depend on them) comes from ``python tests/tiny_captioners.py DIR --kind blip
--preset bench``; ``--kind default`` measures the built-in captioner.

Usage:
    python benchmarks/bench_caption.py --folder /tmp/blip-bench [--bundle /tmp/b/blip-bench] [--threads 2]
                                       [--new-tokens 20] [--rounds 6 --block 2] [--json out.json] [--markdown out.md]
    python benchmarks/bench_caption.py --kind default [--bundle ~/.cache/edgemm/bundles/captioner]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (device_info, interleaved_rounds, limit_native_threads, percentiles, publish, stage, status_mib,
                     target_line)


def _reference(kind: str, folder: str | None):
    """(CaptionerParts with the transformers reference, a builder of the bundle)."""
    if kind == "default":
        from edgemm.export.models.captioner import default_captioner_parts

        return default_captioner_parts()
    from edgemm.export.models.hf_captioner import CaptionCheckpoint

    if not folder:
        raise SystemExit("--folder is required for a users'-folder captioner (see the docstring to make one)")
    return CaptionCheckpoint(folder).parts()


def _bundle(kind: str, folder: str | None, bundle: str | None, parts) -> Path:
    from edgemm.export.models.captioner import build_captioner_bundle

    path = Path(bundle or f"/tmp/b/caption-{kind}")
    if not (path / "manifest.json").is_file():
        print(f"building {path} …")
        build_captioner_bundle(parts, path, overwrite=path.exists())
    return path


def child(kind: str, side: str, folder: str | None, bundle: str, threads: int, new_tokens: int) -> None:
    """One process that loads one side and captions one photo; prints its peak memory as JSON."""
    from edgemm.runtime.datasets import sample_photos

    photo = sample_photos()[1].image
    if side == "edgemm":
        import edgemm

        model = edgemm.load(bundle, threads=threads)
        model.caption(photo, color="rgb", max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1)
    else:
        import torch

        torch.set_num_threads(threads)
        parts = _reference(kind, folder)
        from edgemm.runtime.image import ImagePreprocessor

        pixels = ImagePreprocessor(parts.image)([photo], color="rgb")
        parts.reference(pixels, {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": 1}, None)
    print(json.dumps({"peak_mib": status_mib("VmHWM")}))


def _peak(kind: str, side: str, args: argparse.Namespace, bundle: Path) -> float | None:
    cmd = [sys.executable, __file__, "--child", side, "--kind", kind, "--bundle", str(bundle),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    if args.folder:
        cmd += ["--folder", args.folder]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="folder", choices=("folder", "default"))
    parser.add_argument("--folder", default=None, help="a VisionEncoderDecoderModel / BLIP folder")
    parser.add_argument("--bundle", default=None, help="its exported bundle (built if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", default=None, choices=("edgemm", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.kind, args.child, args.folder, args.bundle, args.threads, args.new_tokens)
        return 0

    import torch

    import edgemm
    from edgemm.runtime.datasets import sample_photos
    from edgemm.runtime.generation import CachedDecoder, GenerationSettings, generate

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    parts = _reference(args.kind, args.folder)
    bundle = _bundle(args.kind, args.folder, args.bundle, parts)
    info = device_info(args.threads)
    info["native_pools"] = limit_native_threads(args.threads)
    model = edgemm.load(bundle, threads=args.threads)
    photos = [p.image for p in sample_photos()]
    pixels = model.preprocess(photos[:8], color="rgb")
    n = args.new_tokens
    settings = {"max_new_tokens": n, "min_new_tokens": n, "num_beams": 1, "do_sample": False}
    ours_settings = GenerationSettings(**settings)
    g = model.graphs

    def edgemm_side(batch: int):
        def run() -> dict[str, float]:
            px = pixels[:batch]
            t0 = time.perf_counter()
            memory = g.memory(px)
            t1 = time.perf_counter()
            hyps = generate(CachedDecoder(g.decoder_backend, g.graph, memory), g.prompt(batch), ours_settings,
                            g.spec.eos_ids, g.spec.pad_id, g.spec.max_positions)
            t2 = time.perf_counter()
            [model.tokenizer.decode(h.tokens, skip_special_tokens=True) for h in hyps]
            t3 = time.perf_counter()
            return {"total": (t3 - t0) * 1e3, "image": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3,
                    "detokenize": (t3 - t2) * 1e3}
        return run

    def torch_side(batch: int):
        def run() -> dict[str, float]:
            t0 = time.perf_counter()
            parts.reference(pixels[:batch], settings, None)
            return {"total": (time.perf_counter() - t0) * 1e3}
        return run

    # the two sides must say the same thing
    ours = [h.tokens for h in generate(CachedDecoder(g.decoder_backend, g.graph, g.memory(pixels)),
                                       g.prompt(len(pixels)), ours_settings, g.spec.eos_ids, g.spec.pad_id,
                                       g.spec.max_positions)]
    theirs = parts.reference(pixels, settings, None)
    same = ours == theirs
    results: dict[str, Any] = {}
    for batch in (1, 8):
        samples, _ = interleaved_rounds({"edgemm": edgemm_side(batch), "pytorch": torch_side(batch)},
                                        rounds=args.rounds, block=args.block, warmup=1)
        e, t = samples["edgemm"], samples["pytorch"]
        results[f"batch{batch}"] = {
            "edgemm_ms": percentiles(stage(e, "total")), "pytorch_ms": percentiles(stage(t, "total")),
            "edgemm_stages_ms": {k: float(np.median(stage(e, k))) for k in ("image", "decode", "detokenize")},
            "speedup": float(np.median(stage(t, "total")) / np.median(stage(e, "total"))),
            "edgemm_tokens_per_s": batch * n / (np.median(stage(e, "total")) / 1e3),
            "pytorch_tokens_per_s": batch * n / (np.median(stage(t, "total")) / 1e3),
        }

    # decoder step time as the caption grows: flat when each step feeds only its new token
    long_n = min(64, g.spec.max_positions - len(g.spec.start_ids))
    steps: list[float] = []

    class Timed(CachedDecoder):
        def step(self, input_ids):
            t = time.perf_counter()
            out = super().step(input_ids)
            steps.append((time.perf_counter() - t) * 1e3)
            return out

    for _ in range(3):
        generate(Timed(g.decoder_backend, g.graph, g.memory(pixels[:1])), g.prompt(1),
                 GenerationSettings(max_new_tokens=long_n, min_new_tokens=long_n), g.spec.eos_ids, g.spec.pad_id,
                 g.spec.max_positions)
    per_step = np.median(np.asarray(steps).reshape(3, long_n), axis=0)
    growth = {"first_steps_ms": float(np.median(per_step[1:6])), "last_steps_ms": float(np.median(per_step[-5:])),
              "tokens": long_n}
    peaks = {side: _peak(args.kind, side, args, bundle) for side in ("edgemm", "torch")}

    rows = []
    for batch in (1, 8):
        r = results[f"batch{batch}"]
        s = r["edgemm_stages_ms"]
        rows.append(f"| {batch} | {r['edgemm_ms']['p50']:.1f} (image {s['image']:.1f} + decode {s['decode']:.1f} + "
                    f"detok {s['detokenize']:.2f}) | {r['pytorch_ms']['p50']:.1f} | **{r['speedup']:.2f}x** | "
                    f"{r['edgemm_tokens_per_s']:.0f} vs {r['pytorch_tokens_per_s']:.0f} |")
    table = "\n".join([
        f"| batch | edgemm ms per batch, {n} new tokens (stages) | transformers generate() ms | speed-up | tokens/s |",
        "|---|---|---|---|---|", *rows])
    mem = (f"peak memory of a process captioning one photo: edgemm {peaks['edgemm']:.0f} MiB, PyTorch "
           f"{peaks['torch']:.0f} MiB" if all(peaks.values()) else "peak memory: not measured")
    notes = (f"Model: {parts.source.get('architecture', parts.name)} ({bundle}); greedy, exactly {n} new tokens, "
             f"preprocessed sample photos on both sides. Identical tokens on both sides: {same}. Decoder step as "
             f"the caption grows: {growth['first_steps_ms']:.2f} ms (steps 2-6) vs {growth['last_steps_ms']:.2f} ms "
             f"(last 5 of {long_n}). {mem}.\n\n" + target_line(
                 "≥2x generate() at batch 1", results["batch1"]["speedup"] >= 2.0,
                 f"{results['batch1']['speedup']:.2f}x"))
    publish(info, table, title="Captioning: edgemm vs transformers generate()", threads=args.threads, notes=notes,
            markdown_path=args.markdown, json_path=args.json,
            payload={"results": results, "identical_tokens": same, "step_growth": growth, "peak_mib": peaks,
                     "bundle": str(bundle), "new_tokens": n})
    print(notes)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
