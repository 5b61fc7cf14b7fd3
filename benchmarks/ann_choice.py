"""Which embedded HNSW library backs ``VectorIndex(kind="hnsw")``: usearch against FAISS, measured.

For each collection size, one process builds both libraries' HNSW graphs over the
same clustered vectors (``_common.clustered_vectors``) with the same connectivity
and construction depth, then measures, one library at a time: build time and
memory, recall@k against the exact top-k and queries/s for each ``ef_search``
(a batch of queries on ``--threads`` threads, and one query at a time on one
thread), file size, save and load time, and search from a memory-mapped file
(usearch ``Index.restore(path, view=True)``; FAISS ``read_index`` with
``IO_FLAG_MMAP_IFC``, then ``IO_FLAG_MMAP``). It also tries to remove ids.

Needs both libraries: ``pip install usearch 'edgemm[faiss]'`` (edgemm itself uses FAISS, the one chosen).

Usage:
    python benchmarks/ann_choice.py [--sizes 200000,1000000 --dim 384 --queries 1000 -k 10
        --connectivity 16 --ef-construction 128 --ef-search 16,32,64,128,256
        --sweep-connectivity 32 --sweep-max-n 200000 --threads 2 --workdir /tmp/ann-choice
        --json benchmarks/results/index-ann-choice.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import clustered_vectors, device_info, recall_at_k, status_mib, version
from edgemm._index import VectorIndex

SINGLE_QUERIES = 200  # queries timed one at a time for the latency column
MMAP_EF = 64  # the ef_search the memory-mapped and reloaded indexes are checked at


class _Usearch:
    name = "usearch"

    def __init__(self, dim: int, connectivity: int, ef_construction: int, threads: int) -> None:
        from usearch.index import Index

        self.threads = threads
        self.index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity,
                           expansion_add=ef_construction)

    def add(self, data: np.ndarray) -> None:
        self.index.add(np.arange(len(data), dtype=np.uint64), data, threads=self.threads)

    def search(self, queries: np.ndarray, k: int, ef: int, threads: int) -> np.ndarray:
        self.index.expansion_search = ef
        return self.index.search(queries, k, threads=threads).keys.astype(np.int64).reshape(len(queries), k)

    def save(self, path: Path) -> None:
        self.index.save(str(path))

    @classmethod
    def load(cls, path: Path, mmap: bool, threads: int) -> tuple[Any, str]:
        from usearch.index import Index

        opened = cls.__new__(cls)
        opened.threads = threads
        opened.index = Index.restore(str(path), view=mmap)
        return opened, "Index.restore(view=True)" if mmap else "Index.restore()"

    def remove(self, ids: np.ndarray) -> str:
        removed = self.index.remove(ids.astype(np.uint64))
        return f"yes ({int(np.sum(removed))} of {len(ids)} removed)"


class _Faiss:
    name = "faiss"

    def __init__(self, dim: int, connectivity: int, ef_construction: int, threads: int) -> None:
        import faiss

        self.faiss = faiss
        faiss.omp_set_num_threads(threads)
        self.threads = threads
        hnsw = faiss.IndexHNSWFlat(dim, connectivity, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        # IndexIDMap2 is what arbitrary ids need; searching through it costs nothing measurable.
        self.index = faiss.IndexIDMap2(hnsw)

    def add(self, data: np.ndarray) -> None:
        self.index.add_with_ids(data, np.arange(len(data), dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, ef: int, threads: int) -> np.ndarray:
        self.faiss.omp_set_num_threads(threads)
        params = self.faiss.SearchParametersHNSW(efSearch=ef)
        _, ids = self.index.search(queries, k, params=params)
        self.faiss.omp_set_num_threads(self.threads)
        return ids

    def save(self, path: Path) -> None:
        self.faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, mmap: bool, threads: int) -> tuple[Any, str]:
        import faiss

        opened = cls.__new__(cls)
        opened.faiss, opened.threads = faiss, threads
        if not mmap:
            opened.index = faiss.read_index(str(path))
            return opened, "read_index()"
        errors = []
        for flag in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            try:
                opened.index = faiss.read_index(str(path), getattr(faiss, flag))
                return opened, f"read_index({flag})"
            except RuntimeError as e:
                errors.append(f"{flag}: {str(e).splitlines()[0][:120]}")
        raise RuntimeError("; ".join(errors))

    def remove(self, ids: np.ndarray) -> str:
        try:
            self.index.remove_ids(ids.astype(np.int64))
        except RuntimeError as e:
            return "no: " + str(e).strip().splitlines()[-1].split(": ")[-1][:60]
        return "yes"


LIBRARIES: dict[str, Callable[..., Any]] = {"usearch": _Usearch, "faiss": _Faiss}


def _anon_mib() -> float:
    """Private (anonymous) resident memory: what an index costs beyond file pages the kernel can drop."""
    return status_mib("RssAnon") or 0.0


def _trim() -> None:
    """Return freed heap to the system (glibc), so the next RssAnon difference is the next allocation's."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _qps(fn: Callable[[], Any], n: int, min_s: float = 2.0) -> float:
    """Queries per second of ``fn`` (which runs ``n`` queries): best of repeats for at least ``min_s``."""
    fn()
    best, started = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started > min_s:
            return n / best


def _single_ms(lib: Any, queries: np.ndarray, k: int, ef: int) -> float:
    """Median milliseconds of one query on one thread (a camera loop's call)."""
    samples = []
    for q in queries[:SINGLE_QUERIES]:
        t0 = time.perf_counter()
        lib.search(q[None, :], k, ef, 1)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _measure(name: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
             connectivity: int, workdir: Path) -> dict[str, Any]:
    k = truth.shape[1]
    _trim()
    anon0 = _anon_mib()
    t0 = time.perf_counter()
    lib = LIBRARIES[name](data.shape[1], connectivity, args.ef_construction, args.threads)
    lib.add(data)
    build_s = time.perf_counter() - t0
    row: dict[str, Any] = {"library": name, "n": len(data), "connectivity": connectivity,
                           "ef_construction": args.ef_construction, "build_s": build_s,
                           "build_vectors_per_s": len(data) / build_s, "memory_mib": _anon_mib() - anon0}
    print(f"  {name} M={connectivity}: built in {build_s:.1f} s, {row['memory_mib']:.0f} MiB", flush=True)
    sweep = []
    for ef in args.ef_search:
        found = lib.search(queries, k, ef, args.threads)
        sweep.append({"ef_search": ef, "recall": recall_at_k(found, truth),
                      "qps": _qps(lambda: lib.search(queries, k, ef, args.threads), len(queries)),
                      "single_ms": _single_ms(lib, queries, k, ef)})
        print(f"    ef={ef}: recall {sweep[-1]['recall']:.4f}, {sweep[-1]['qps']:.0f} q/s, "
              f"{sweep[-1]['single_ms']:.2f} ms/query", flush=True)
    row["sweep"] = sweep

    path = workdir / f"{name}-{len(data)}-{connectivity}.index"
    t0 = time.perf_counter()
    lib.save(path)
    row["save_s"] = time.perf_counter() - t0
    row["file_mib"] = path.stat().st_size / 2**20
    ids = np.arange(0, len(data), 100)
    row["remove"] = lib.remove(ids)
    lib = None  # frees the index before the files are opened in child processes
    gc.collect()

    np.save(workdir / "queries.npy", queries)
    for mmap in (False, True):
        key = "mmap" if mmap else "load"
        # A fresh process per open: freed heap of this one would hide what loading allocates.
        out = workdir / "probe.json"
        child = subprocess.run([sys.executable, __file__, "--probe", name, str(path), str(int(mmap)),
                                str(workdir / "queries.npy"), str(k), str(MMAP_EF), str(args.threads), str(out)],
                               capture_output=True, text=True, timeout=3600)
        if child.returncode != 0:
            row[key] = {"error": (child.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"    {key}: failed: {row[key]['error']}", flush=True)
            continue
        probe = json.loads(out.read_text())
        probe["recall"] = recall_at_k(np.load(workdir / "found.npy"), truth)
        row[key] = probe
        print(f"    {key} via {probe['how']}: open {probe['open_s']:.2f} s, +{probe['memory_after_open_mib']:.0f} MiB "
              f"private, +{probe['memory_after_search_mib']:.0f} MiB after searching, recall {probe['recall']:.4f}, "
              f"{probe['qps']:.0f} q/s", flush=True)
    path.unlink()
    return row


def _probe(argv: list[str]) -> int:
    """Child process: open one saved index, search the queries, report time and private memory."""
    name, path, mmap, queries_path, k, ef, threads, out = argv
    queries = np.load(queries_path)
    k, ef, threads = int(k), int(ef), int(threads)
    __import__("usearch.index" if name == "usearch" else "faiss")
    anon0 = _anon_mib()
    t0 = time.perf_counter()
    opened, how = LIBRARIES[name].load(Path(path), mmap == "1", threads)
    open_s = time.perf_counter() - t0
    anon_open = _anon_mib() - anon0
    found = opened.search(queries, k, ef, threads)
    qps = _qps(lambda: opened.search(queries, k, ef, threads), len(queries))
    np.save(Path(queries_path).with_name("found.npy"), found)
    Path(out).write_text(json.dumps({"how": how, "open_s": open_s, "memory_after_open_mib": anon_open,
                                     "memory_after_search_mib": _anon_mib() - anon0, "qps": qps}))
    return 0


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"## usearch vs FAISS HNSW (dim {report['dim']}, k = {report['k']}, {report['queries']} held-out "
             f"queries, ef_construction {report['ef_construction']}, {report['threads']} threads)", "",
             f"Clustered data (`_common.clustered_vectors`, seed {report['seed']}). Device: "
             f"{report['device']['cpu_model']}, {report['device']['usable_cores']} cores, load average at start "
             f"{report['device']['loadavg_1m']}. usearch {report['versions']['usearch']}, faiss-cpu "
             f"{report['versions']['faiss']}, numpy {report['versions']['numpy']}.", "",
             "| n | library | M | ef_search | recall@k | batch q/s | one query, 1 thread |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for size in report["sizes"]:
        lines.append(f"| {size['n']:,} | exact (edgemm) | | | 1.0000 | {size['exact_qps']:.0f} | "
                     f"{size['exact_single_ms']:.2f} ms |")
        for row in size["libraries"]:
            for s in row["sweep"]:
                lines.append(f"| {row['n']:,} | {row['library']} | {row['connectivity']} | {s['ef_search']} | "
                             f"{s['recall']:.4f} | {s['qps']:.0f} | {s['single_ms']:.2f} ms |")
    lines += ["", f"Files: saved, then opened in a fresh process and searched at ef_search {MMAP_EF}; memory is "
              "private (anonymous) resident memory, so the file pages a memory map shares with the page cache "
              "do not count.", "",
              "| n | library | M | build | vectors/s | build memory | file | save | load | load memory | load q/s "
              "| mmap open | mmap memory after search | mmap q/s | remove |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def opened(o: dict[str, Any]) -> str:
        if "error" in o:
            return f"failed ({o['error'][:50]}) | | "
        return f"{o['open_s']:.2f} s | {o['memory_after_search_mib']:.0f} MiB | {o['qps']:.0f}"

    for size in report["sizes"]:
        for row in size["libraries"]:
            lines.append(f"| {row['n']:,} | {row['library']} | {row['connectivity']} | {row['build_s']:.1f} s | "
                         f"{row['build_vectors_per_s']:.0f} | {row['memory_mib']:.0f} MiB | "
                         f"{row['file_mib']:.0f} MiB | "
                         f"{row['save_s']:.2f} s | {opened(row['load'])} | {opened(row['mmap'])} | {row['remove']} |")
    lines += ["", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return _probe(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[200_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--connectivity", type=int, default=16, help="HNSW M for every size")
    parser.add_argument("--sweep-connectivity", type=ints, default=[32],
                        help="further M values, only up to --sweep-max-n")
    parser.add_argument("--sweep-max-n", type=int, default=200_000)
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--ef-search", type=ints, default=[16, 32, 64, 128, 256])
    parser.add_argument("--libraries", default="usearch,faiss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ann-choice"))
    parser.add_argument("--json", dest="json_path", type=Path, help="write the report here (and .md beside it)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    libraries = args.libraries.split(",")

    report: dict[str, Any] = {
        "command": "python benchmarks/ann_choice.py " + " ".join(argv),
        "dim": args.dim, "k": args.k, "queries": args.queries, "ef_construction": args.ef_construction,
        "threads": args.threads, "seed": args.seed, "device": device_info(args.threads),
        "versions": {"usearch": version("usearch"), "faiss": version("faiss-cpu"), "numpy": np.__version__},
        "sizes": [],
    }
    for n in args.sizes:
        t0 = time.perf_counter()
        data, queries = clustered_vectors(n, args.dim, n_queries=args.queries, seed=args.seed)
        print(f"n={n}: data in {time.perf_counter() - t0:.1f} s", flush=True)
        exact = VectorIndex(args.dim, metric="ip")
        exact.add(data)
        truth = np.array([[h.id for h in hits] for hits in exact.search(queries, k=args.k)])
        size: dict[str, Any] = {
            "n": n,
            "exact_qps": _qps(lambda: exact.search(queries, k=args.k), len(queries)),
            "exact_single_ms": statistics.median(
                _time_one(lambda q=q: exact.search(q, k=args.k)) for q in queries[:SINGLE_QUERIES // 4]),
            "libraries": [],
        }
        print(f"  exact: {size['exact_qps']:.0f} q/s, {size['exact_single_ms']:.2f} ms/query", flush=True)
        exact = None  # frees 4 bytes x n x dim before the libraries build theirs
        for name in libraries:
            for m in [args.connectivity] + ([c for c in args.sweep_connectivity if n <= args.sweep_max_n]):
                size["libraries"].append(_measure(name, data, queries, truth, args, m, args.workdir))
        report["sizes"].append(size)
        del data
        gc.collect()
        if args.json_path:  # after every size, so a long run that is stopped keeps what it measured
            args.json_path.write_text(json.dumps(report, indent=2))
            args.json_path.with_suffix(".md").write_text(_markdown(report))
    print()
    print(_markdown(report))
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def _time_one(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
