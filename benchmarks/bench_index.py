"""Search speed and recall of edgemm's VectorIndex, exact and HNSW, against FAISS IndexFlatIP, in one run.

For each collection size, builds three indexes over the same clustered, L2-normalised
float32 vectors (``_common.clustered_vectors``: a Gaussian mixture shaped like real
embeddings, with held-out queries from the same mixture): edgemm's exact
``VectorIndex``, ``VectorIndex(kind="hnsw")`` with its default ``HnswOptions`` (FAISS's HNSW behind
edgemm's API), and FAISS ``IndexFlatIP`` (exact). Then, for each query batch size, times ``search``
on each index on its own (one warm-up call, then the median of the repeats),
one after the other, and reports recall@k of the HNSW index against the exact top-k
and whether the two exact indexes agree on the best hit. The machine may be
shared: compare the ratios, which come from the same minutes.

Usage:
    python benchmarks/bench_index.py [--sizes 100000,1000000 --dim 384 --queries 1,32,1000
                                      -k 10 --repeats 7 --json benchmarks/results/bench-index.json]
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

from _common import clustered_vectors, recall_at_k
from edgemm._index import VectorIndex


def _threads() -> dict[str, Any]:
    """Thread counts the libraries will use; they matter for a fair ratio."""
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


def _hit_ids(results: list[list[Any]]) -> np.ndarray:
    return np.array([[h.id for h in hits] for hits in results])


def _measure_size(n: int, args: argparse.Namespace, faiss: Any) -> dict[str, Any]:
    batch_sizes = [int(q) for q in args.queries.split(",")]
    data, queries = clustered_vectors(n, args.dim, n_queries=max(batch_sizes), seed=args.seed)
    build: dict[str, float] = {}
    indexes: dict[str, Any] = {}
    for kind in ("exact", "hnsw"):
        t0 = time.perf_counter()
        indexes[kind] = VectorIndex(args.dim, metric="cosine", kind=kind)
        indexes[kind].add(data)
        build[kind] = time.perf_counter() - t0
        print(f"n={n}: {kind} add() {build[kind]:.1f} s", flush=True)
    if faiss is not None:
        t0 = time.perf_counter()
        indexes["faiss"] = faiss.IndexFlatIP(args.dim)
        indexes["faiss"].add(data)
        build["faiss"] = time.perf_counter() - t0
    del data

    search: dict[str, Callable[[np.ndarray], Any]] = {
        "exact": lambda q: indexes["exact"].search(q, k=args.k),
        "hnsw": lambda q: indexes["hnsw"].search(q, k=args.k),
    }
    if faiss is not None:
        search["faiss"] = lambda q: indexes["faiss"].search(q, args.k)

    truth = _hit_ids(indexes["exact"].search(queries, k=args.k))
    rows: list[dict[str, Any]] = []
    for nq in batch_sizes:
        q = queries[:nq]
        row: dict[str, Any] = {"n": n, "queries": nq}
        # One index at a time: alternating calls let FAISS's spinning OpenMP workers
        # and OpenBLAS's threads steal each other's cores on small machines.
        for name, fn in search.items():
            row[f"{name}_ms"], row[f"{name}_repeats"] = _time(lambda: fn(q), args.repeats, args.budget_s)
        row["hnsw_recall"] = recall_at_k(_hit_ids(indexes["hnsw"].search(q, k=args.k)), truth[:nq])
        row["hnsw_speedup"] = row["exact_ms"] / row["hnsw_ms"]
        if faiss is not None:
            hits = indexes["exact"].search(q, k=1)
            ours = np.array([h[0].id for h in hits])
            our_scores = np.array([h[0].score for h in hits])
            f_scores, f_ids = indexes["faiss"].search(q, 1)
            same = ours == f_ids[:, 0]
            # A different id is only acceptable as a float32 tie between two vectors.
            tie = np.abs(our_scores - f_scores[:, 0]) <= 1e-5
            row |= {"exact_vs_faiss": row["exact_ms"] / row["faiss_ms"], "top1_agree": float(np.mean(same)),
                    "top1_mismatch_not_tie": int(np.sum(~same & ~tie))}
        print(f"  {nq} queries: " + ", ".join(f"{name} {row[f'{name}_ms']:.1f} ms" for name in search)
              + f", hnsw recall@{args.k} {row['hnsw_recall']:.4f}", flush=True)
        rows.append(row)
    return {"n": n, "build_s": build, "results": rows}


def _markdown(report: dict[str, Any]) -> str:
    faiss = report["faiss"] is not None
    lines = [f"## VectorIndex exact vs HNSW vs FAISS IndexFlatIP (dim {report['dim']}, k = {report['k']}, "
             "clustered data, cosine)", "",
             f"Median of up to {report['repeats']} calls after a warm-up, each index timed on its own. "
             f"cpu_count {report['threads']['cpu_count']}, load average at start {report['loadavg_1m']}; "
             f"numpy {report['numpy']}, faiss {report['faiss']}. HNSW (FAISS IndexHNSWFlat): default "
             f"HnswOptions {report['hnsw_options']}.", "",
             "| n | queries | exact | HNSW | " + ("FAISS flat | " if faiss else "")
             + "HNSW speed-up | HNSW recall@k | " + ("exact / FAISS | top-1 agree |" if faiss else ""),
             "|---:|---:|---:|---:|" + ("---:|" if faiss else "") + "---:|---:|" + ("---:|---:|" if faiss else "")]
    for size in report["sizes"]:
        for r in size["results"]:
            cells = [f"{r['n']:,}", str(r["queries"]), f"{r['exact_ms']:.1f} ms", f"{r['hnsw_ms']:.2f} ms"]
            if faiss:
                cells.append(f"{r['faiss_ms']:.1f} ms")
            cells += [f"{r['hnsw_speedup']:.1f}x", f"{r['hnsw_recall']:.4f}"]
            if faiss:
                cells += [f"{r['exact_vs_faiss']:.2f}", f"{r['top1_agree']:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| n | exact add() | HNSW add() | FAISS flat add() |", "|---:|---:|---:|---:|"]
    for size in report["sizes"]:
        b = size["build_s"]
        lines.append(f"| {size['n']:,} | {b['exact']:.1f} s | {b['hnsw']:.1f} s | "
                     + (f"{b['faiss']:.1f} s |" if "faiss" in b else "n/a |"))
    lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated numbers of stored vectors")
    parser.add_argument("--dim", type=int, default=384, help="vector length")
    parser.add_argument("--queries", default="1,32,1000", help="comma-separated query batch sizes")
    parser.add_argument("-k", "--k", type=int, default=10, help="hits per query")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per batch size and index")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a batch size after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="also write the results here (and Markdown beside it)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    try:
        import faiss
    except ImportError:
        faiss = None
        print("note: faiss is not installed (pip install 'edgemm[faiss]'); timing edgemm alone.\n")
    from edgemm import HnswOptions

    report: dict[str, Any] = {
        "command": "python benchmarks/bench_index.py " + " ".join(argv),
        "dim": args.dim, "k": args.k, "repeats": args.repeats, "loadavg_1m": round(os.getloadavg()[0], 2),
        "hnsw_options": str(HnswOptions()), "numpy": np.__version__,
        "faiss": getattr(faiss, "__version__", None) if faiss is not None else None,
        "python": sys.version.split()[0],
        "machine": platform.machine(), "threads": _threads(), "sizes": [],
    }
    for n in (int(s) for s in args.sizes.split(",")):
        report["sizes"].append(_measure_size(n, args, faiss))
        if args.json_path:  # after every size, so a long run that is stopped keeps what it measured
            with open(args.json_path, "w") as f:
                json.dump(report, f, indent=2)
            with open(os.path.splitext(args.json_path)[0] + ".md", "w") as f:
                f.write(_markdown(report))
    print()
    print(_markdown(report))
    # Exact search must agree with FAISS on the best hit; anything else is a bug, not noise.
    if any(r.get("top1_mismatch_not_tie", 0) for s in report["sizes"] for r in s["results"]):
        print("error: top-1 ids differ from FAISS beyond float32 ties", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
