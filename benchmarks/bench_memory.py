"""Peak resident memory: an edgemm runtime process vs one holding the PyTorch reference.

Each measurement is a fresh child process (this script re-run with
``--child KIND``), so imports and allocator state never leak between them:

* ``numpy``: imports numpy only (the floor any Python vision process pays);
* ``edgemm``: imports edgemm, loads the bundle, runs one ``classify`` on a
  1920x1080 frame with 10 labels and one ``embed_texts`` on the sample sentences;
* ``torch``: imports torch and the reference model code, builds the PyTorch
  reference (image tower + text tower + tokenizer), then does the same
  classify (PIL preprocessing, class-space scoring) and text embedding.

The peak is the kernel's resident high-water mark (``VmHWM`` in
/proc/self/status; ``ru_maxrss`` where there is no /proc), read after each
stage. The ``edgemm`` child also reports whether ``torch`` (or
``transformers``) was imported: the runtime must not import it, so the script
exits 1 if it was. Children run in alternating order, ``--repeats`` times each;
the table shows medians.

Usage:
    python benchmarks/bench_memory.py [--bundle /tmp/b/default] [--threads 2]
                                      [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

KINDS = ("numpy", "edgemm", "torch")
STAGES = ("import", "load", "classify", "embed_texts")
_START = time.perf_counter()


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (e.g. VmHWM, VmRSS) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_mib() -> float:
    """This process's resident high-water mark.

    VmHWM belongs to the process's own address space, which exec starts afresh.
    ``ru_maxrss`` does not: Linux carries the parent's RSS at fork into the
    child's ``ru_maxrss`` across exec, so a child of a 180 MiB parent reports at
    least 180 MiB. It is only the fallback where /proc is missing (in KiB on Linux).
    """
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, bundle: str, threads: int, frame_path: str) -> dict[str, Any]:
    """The measured work of one child; returns what it reports to the parent."""
    peaks: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def mark(name: str) -> None:
        peaks[name] = _peak_mib()
        seconds[name] = time.perf_counter() - _START

    if kind == "numpy":
        import numpy as np  # noqa: F401

        mark("import")
    elif kind == "edgemm":
        import numpy as np

        import edgemm
        from edgemm.runtime.datasets import SAMPLE_SENTENCES

        mark("import")
        model = edgemm.load(bundle, providers=("cpu",), threads=threads)
        mark("load")
        labels = json.loads(os.environ["EDGEMM_BENCH_LABELS"])
        model.classify(np.load(frame_path), labels=labels, top_k=5)
        mark("classify")
        model.embed_texts(list(SAMPLE_SENTENCES))
        mark("embed_texts")
    elif kind == "torch":
        import numpy as np
        import torch

        from bench_classify import TorchClassifier
        from edgemm.runtime.datasets import SAMPLE_SENTENCES

        torch.set_num_threads(threads)
        mark("import")
        labels = json.loads(os.environ["EDGEMM_BENCH_LABELS"])
        # Building the reference also embeds the 1000 class names and the labels once.
        reference = TorchClassifier(labels, tau=float(os.environ["EDGEMM_BENCH_TAU"]))
        mark("load")
        reference(np.load(frame_path), top_k=5)
        mark("classify")
        with torch.inference_mode():
            reference.text_embedder(list(SAMPLE_SENTENCES))
        mark("embed_texts")
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    return {
        "kind": kind,
        "peak_mib": peaks,
        "seconds": seconds,
        "rss_end_mib": _status_mib("VmRSS"),
        "torch_imported": "torch" in sys.modules,
        "transformers_imported": "transformers" in sys.modules,
        "modules": len(sys.modules),
    }


def spawn(kind: str, args: argparse.Namespace, frame_path: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one child and parse the JSON line it prints last."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--bundle", args.bundle,
           "--threads", str(args.threads), "--frame", frame_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="/tmp/b/default", help="edgemm bundle directory")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime and torch")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per kind")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--frame", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        # Runs inside the measured process: nothing but the work and one JSON line.
        print(json.dumps(run_child(args.child, args.bundle, args.threads, args.frame)))
        return 0

    import statistics

    import numpy as np

    from edgemm.runtime.bundle import Bundle
    from edgemm.runtime.datasets import sample_photos

    from _common import CLASSIFY_LABELS, device_info, frame_from_photo, print_device, target_line, write_json

    info = device_info(args.threads)
    tau = Bundle(args.bundle).manifest.scoring.tau
    env = dict(os.environ, EDGEMM_BENCH_LABELS=json.dumps(list(CLASSIFY_LABELS)), EDGEMM_BENCH_TAU=repr(tau))
    # Children import bench_classify / _common from this folder.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                      env.get("PYTHONPATH")]))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        # The frame is made here so no child pays for the sample-photo loaders (scikit-image & co).
        frame_path = os.path.join(tmp, "frame.npy")
        np.save(frame_path, frame_from_photo(next(p for p in sample_photos() if p.name == "skimage.chelsea").image))
        for r in range(args.repeats):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                runs[kind].append(spawn(kind, args, frame_path, env))

    def med(kind: str, key: str, stage_name: str | None = None) -> float | None:
        values = [run[key][stage_name] if stage_name else run[key] for run in runs[kind]
                  if (run[key].get(stage_name) if stage_name else run[key]) is not None]
        return statistics.median(values) if values else None

    rows: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        last = STAGES[0] if kind == "numpy" else STAGES[-1]
        rows[kind] = {
            "peak_mib": med(kind, "peak_mib", last),
            "stages_peak_mib": {s: med(kind, "peak_mib", s) for s in STAGES if s in runs[kind][0]["peak_mib"]},
            "seconds_to_done": med(kind, "seconds", last),
            "rss_end_mib": med(kind, "rss_end_mib"),
            "torch_imported": any(run["torch_imported"] for run in runs[kind]),
            "transformers_imported": any(run["transformers_imported"] for run in runs[kind]),
            "modules": med(kind, "modules"),
        }
    base = rows["numpy"]["peak_mib"]
    info["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    print_device(info)
    print(f"each row: median of {args.repeats} fresh processes ({sys.executable}); peak = VmHWM after the "
          "last stage; stages: import -> load -> one classify (1080p frame, 10 labels) -> one embed_texts "
          "(8 sample sentences)\n")
    print("| process | peak RSS MiB | above numpy baseline MiB | after import | after load | after classify "
          "| RSS at end MiB | torch imported | seconds (import..done) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    names = {"numpy": "baseline: import numpy", "edgemm": "edgemm runtime (ONNX Runtime)",
             "torch": "PyTorch reference model"}
    for kind in KINDS:
        row = rows[kind]
        cells = {name: f"{v:.0f}" if (v := row["stages_peak_mib"].get(name)) is not None else "-"
                 for name in STAGES}
        print(f"| {names[kind]} | {row['peak_mib']:.0f} | {row['peak_mib'] - base:.0f} | {cells['import']} | "
              f"{cells['load']} | {cells['classify']} | {row['rss_end_mib']:.0f} | "
              f"{'yes' if row['torch_imported'] else 'no'} | {row['seconds_to_done']:.1f} |")
    e, t = rows["edgemm"]["peak_mib"], rows["torch"]["peak_mib"]
    print(f"\nPyTorch / edgemm peak RSS: {t / e:.2f}x; above the numpy baseline: {(t - base) / (e - base):.2f}x")
    print(f"edgemm process imported transformers: {'yes' if rows['edgemm']['transformers_imported'] else 'no'}")
    torch_free = not rows["edgemm"]["torch_imported"]
    print(target_line("edgemm runtime does not import torch", torch_free,
                      "'torch' not in sys.modules" if torch_free else "'torch' in sys.modules"))

    if args.json_path:
        write_json(args.json_path, {"benchmark": "memory", "device": info, "repeats": args.repeats,
                                    "results": rows, "runs": runs})
    if not torch_free:
        print("error: the edgemm runtime process imported torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
