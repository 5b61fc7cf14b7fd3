"""Search latency of edgemm's exact VectorIndex against FAISS IndexFlatIP.

Builds ``n`` random L2-normalised float32 vectors, then times ``search`` for each
query batch size on both indexes in the same process. Each library is timed
on its own (one warm-up call, then the median of the repeats), one after the
other for each batch size. Also checks that the top-1 ids agree.

Usage:
    python benchmarks/bench_index.py [--n 100000 --dim 384 --queries 1,32,1000
                                      --k 10 --repeats 7 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgemm._index import VectorIndex


def _threads() -> dict[str, Any]:
    """Thread counts the two libraries will use; both matter for a fair ratio."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        from threadpoolctl import threadpool_info

        # Every native pool loaded: numpy's OpenBLAS and, once imported, FAISS's BLAS and OpenMP.
        info["native_pools"] = [
            {
                "api": pool.get("internal_api"),
                "threads": pool.get("num_threads"),
                "version": pool.get("version"),
                "lib": os.path.basename(pool.get("filepath") or ""),
            }
            for pool in threadpool_info()
        ]
    except ImportError:
        info["native_pools"] = "unknown (pip install threadpoolctl to record them)"
    try:
        import faiss

        info["faiss_omp"] = faiss.omp_get_max_threads()
    except ImportError:
        info["faiss_omp"] = None
    return info


def _time(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[float, int]:
    """Median milliseconds of ``fn`` after one warm-up call, and the number of samples."""
    fn()
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        # Large batches take seconds each on small machines: stop early, but keep >= 3 samples.
        if i >= 2 and time.perf_counter() - started > budget_s:
            break
    return statistics.median(samples), len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="stored vectors")
    parser.add_argument("--dim", type=int, default=384, help="vector length")
    parser.add_argument("--queries", default="1,32,1000", help="comma-separated query batch sizes")
    parser.add_argument("--k", type=int, default=10, help="hits per query")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per batch size and library")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a batch size after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)
    batch_sizes = [int(q) for q in args.queries.split(",")]

    rng = np.random.default_rng(args.seed)
    data = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = rng.standard_normal((max(batch_sizes), args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    t0 = time.perf_counter()
    index = VectorIndex(args.dim, metric="cosine")
    index.add(data)
    edgemm_build_s = time.perf_counter() - t0

    try:
        import faiss
    except ImportError:
        faiss = None
        print("note: faiss is not installed (pip install 'edgemm[faiss]'); timing edgemm alone.\n")
    flat = None
    if faiss is not None:
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(data)

    rows: list[dict[str, Any]] = []
    for nq in batch_sizes:
        q = queries[:nq]
        # One library at a time: alternating calls let FAISS's spinning OpenMP workers
        # and OpenBLAS's threads steal each other's cores on small machines.
        edgemm_ms, repeats = _time(lambda: index.search(q, k=args.k), args.repeats, args.budget_s)
        row: dict[str, Any] = {"queries": nq, "edgemm_ms": edgemm_ms, "repeats": repeats}
        if flat is not None:
            faiss_ms, _ = _time(lambda: flat.search(q, args.k), args.repeats, args.budget_s)
            hits = index.search(q, k=args.k)
            ours = np.array([h[0].id for h in hits])
            our_scores = np.array([h[0].score for h in hits])
            f_scores, f_ids = flat.search(q, args.k)
            same = ours == f_ids[:, 0]
            # A different id is only acceptable as a float32 tie between two vectors.
            tie = np.abs(our_scores - f_scores[:, 0]) <= 1e-5
            row |= {
                "faiss_ms": faiss_ms,
                "ratio": edgemm_ms / faiss_ms,
                "top1_agree": float(np.mean(same)),
                "top1_mismatch_not_tie": int(np.sum(~same & ~tie)),
            }
        rows.append(row)

    threads = _threads()
    print(f"n={args.n} dim={args.dim} k={args.k} metric=cosine (edgemm) / IndexFlatIP (faiss), "
          f"median of up to {args.repeats} after warm-up")
    print(f"threads: cpu_count={threads['cpu_count']} faiss omp_get_max_threads={threads['faiss_omp']}")
    pools = threads["native_pools"]
    for pool in pools if isinstance(pools, list) else [pools]:
        print(f"  {pool}")
    print(f"edgemm add(): {edgemm_build_s:.2f} s\n")
    print("| queries | edgemm ms | faiss ms | ratio (edgemm/faiss) | top-1 agree |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if "faiss_ms" in r:
            print(f"| {r['queries']} | {r['edgemm_ms']:.1f} | {r['faiss_ms']:.1f} | {r['ratio']:.2f} | {r['top1_agree']:.1%} |")
        else:
            print(f"| {r['queries']} | {r['edgemm_ms']:.1f} | n/a | n/a | n/a |")

    if args.json_path:
        report = {
            "n": args.n,
            "dim": args.dim,
            "k": args.k,
            "results": rows,
            "threads": threads,
            "edgemm_add_s": edgemm_build_s,
            "numpy": np.__version__,
            "faiss": getattr(faiss, "__version__", None) if faiss is not None else None,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
        }
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json_path}")
    # Exact search must agree with FAISS on the best hit; anything else is a bug, not noise.
    if any(r.get("top1_mismatch_not_tie", 0) for r in rows):
        print("error: top-1 ids differ from FAISS beyond float32 ties", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
