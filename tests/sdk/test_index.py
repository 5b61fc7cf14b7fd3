"""Tests for edgemm._index.VectorIndex: exactness, mutation, files and errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgemm._index import Hit, VectorIndex
from edgemm.runtime.errors import InputError
from edgemm.runtime.limits import LIMITS

REPO_ROOT = Path(__file__).resolve().parents[2]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(
    data: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k in float64: (rows, scores), best first."""
    data = data.astype(np.float64)
    queries = queries.astype(np.float64)
    if metric == "cosine":
        data, queries = _unit(data), _unit(queries)
    scores = queries @ data.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def _assert_well_separated(data: np.ndarray, queries: np.ndarray, k: int, metric: str) -> None:
    """Guard against float32-vs-float64 near-ties making an id comparison meaningless."""
    _, scores = _reference(data, queries, min(k + 1, len(data)), metric)
    assert np.diff(scores, axis=1).max() < -2e-6, "test data has near-ties; pick another seed"


def _hit_ids(results: list[list[Hit]]) -> list[list]:
    return [[h.id for h in hits] for hits in results]


def _assert_same_hits(a: list[list[Hit]], b: list[list[Hit]]) -> None:
    """Same ids, order and metadata; scores equal up to float32 rounding.

    BLAS picks different kernels (gemv vs gemm, other blockings) for other
    batch sizes, so the last bits of a score may differ; ranks must not.
    """
    assert _hit_ids(a) == _hit_ids(b)
    assert [[h.metadata for h in hits] for hits in a] == [[h.metadata for h in hits] for hits in b]
    np.testing.assert_allclose(
        [h.score for hits in a for h in hits], [h.score for hits in b for h in hits], rtol=0, atol=1e-6
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k", [1, 7, 10])
def test_matches_brute_force(metric: str, k: int) -> None:
    # n=2000 with k<=10 goes through the grouped top-k, including its tail columns.
    rng = np.random.default_rng(k)
    data = rng.standard_normal((2000, 48)).astype(np.float32) * rng.uniform(0.5, 2.0, (2000, 1)).astype(np.float32)
    queries = rng.standard_normal((40, 48)).astype(np.float32)
    _assert_well_separated(data, queries, k, metric)
    index = VectorIndex(48, metric=metric)
    assert index.add(data) == list(range(2000))

    results = index.search(queries, k=k)
    ref_rows, ref_scores = _reference(data, queries, k, metric)
    assert _hit_ids(results) == ref_rows.tolist()
    got_scores = np.array([[h.score for h in hits] for hits in results])
    np.testing.assert_allclose(got_scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert all(isinstance(h.score, float) for h in results[0])


def test_small_index_path_matches_brute_force(rng: np.random.Generator) -> None:
    # n/k < 16 takes the plain argpartition path.
    data = rng.standard_normal((60, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    _assert_well_separated(data, queries, 10, "ip")
    index = VectorIndex(8, metric="ip")
    index.add(data)
    assert _hit_ids(index.search(queries, k=10)) == _reference(data, queries, 10, "ip")[0].tolist()


def test_batched_equals_one_by_one(rng: np.random.Generator) -> None:
    data = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((25, 32)).astype(np.float32)
    index = VectorIndex(32)
    index.add(data, metadata=[{"row": i} for i in range(3000)])
    batched = index.search(queries, k=5)
    one_by_one = [index.search(q, k=5)[0] for q in queries]
    _assert_same_hits(batched, one_by_one)


def test_chunked_queries_equal_unchunked(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgemm._index as index_module

    data = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((37, 16)).astype(np.float32)
    index = VectorIndex(16)
    index.add(data)
    whole = index.search(queries, k=4)
    # A budget of 10 rows of scores forces 4 uneven-looking chunks of 10/10/10/7 queries.
    monkeypatch.setattr(index_module, "_SCORE_BUDGET_BYTES", 4 * 500 * 10)
    _assert_same_hits(index.search(queries, k=4), whole)


def test_k_larger_than_index_returns_all_sorted(rng: np.random.Generator) -> None:
    index = VectorIndex(6, metric="ip")
    data = rng.standard_normal((5, 6)).astype(np.float32)
    index.add(data, ids=["a", "b", "c", "d", "e"])
    (hits,) = index.search(data[0], k=50)
    assert len(hits) == 5
    assert sorted(h.id for h in hits) == ["a", "b", "c", "d", "e"]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, np.sort(data.astype(np.float64) @ data[0])[::-1], rtol=1e-5)


def test_faiss_flat_ip_agrees(rng: np.random.Generator) -> None:
    faiss = pytest.importorskip("faiss")
    data = _unit(rng.standard_normal((5000, 64))).astype(np.float32)
    queries = _unit(rng.standard_normal((30, 64))).astype(np.float32)
    _assert_well_separated(data, queries, 10, "ip")
    flat = faiss.IndexFlatIP(64)
    flat.add(data)
    f_scores, f_rows = flat.search(queries, 10)

    index = VectorIndex(64, metric="cosine")
    index.add(data)
    results = index.search(queries, k=10)
    assert _hit_ids(results) == f_rows.tolist()
    np.testing.assert_allclose([[h.score for h in hits] for hits in results], f_scores, atol=1e-5)


def test_filter_searches_only_matching(rng: np.random.Generator) -> None:
    data = rng.standard_normal((400, 12)).astype(np.float32)
    queries = rng.standard_normal((6, 12)).astype(np.float32)
    index = VectorIndex(12, metric="ip")
    index.add(data, metadata=[{"even": i % 2 == 0} if i % 3 else None for i in range(400)])
    keep = [i for i in range(400) if i % 3 and i % 2 == 0]
    results = index.search(queries, k=5, filter=lambda m: m is not None and m["even"])
    ref_rows, _ = _reference(data[keep], queries, 5, "ip")
    assert _hit_ids(results) == np.array(keep)[ref_rows].tolist()
    assert index.search(queries[0], filter=lambda m: False) == [[]]


# ---------------------------------------------------------------- mutation


def test_remove_then_search_is_exact_on_the_rest(rng: np.random.Generator) -> None:
    data = rng.standard_normal((1500, 24)).astype(np.float32)
    queries = rng.standard_normal((20, 24)).astype(np.float32)
    index = VectorIndex(24)
    index.add(data)
    removed = set(rng.choice(1500, size=900, replace=False).tolist())
    # Remove the very best hits too, so a stale row would show up in the results.
    removed |= {r[0] for r in _reference(data, queries, 1, "cosine")[0].tolist()}
    assert index.remove(sorted(removed)) == len(removed)
    assert len(index) == 1500 - len(removed)

    kept = np.array(sorted(set(range(1500)) - removed))
    assert index.ids == kept.tolist()
    results = index.search(queries, k=10)
    assert not removed & {h.id for hits in results for h in hits}
    _assert_well_separated(data[kept], queries, 10, "cosine")
    assert _hit_ids(results) == kept[_reference(data[kept], queries, 10, "cosine")[0]].tolist()
    # Removing everything leaves an empty, searchable index.
    index.remove(index.ids)
    assert len(index) == 0 and index.search(queries[:2]) == [[], []]


def test_remove_unknown_or_repeated_id_changes_nothing() -> None:
    index = VectorIndex(3)
    index.add(np.eye(3), ids=[1, "x", 3])
    with pytest.raises(InputError, match="Unknown id 'nope'"):
        index.remove([1, "nope"])
    with pytest.raises(InputError, match="Unknown id '1'"):
        index.remove(["1"])  # the str "1" is not the int 1
    with pytest.raises(InputError, match="duplicates"):
        index.remove([3, 3])
    assert index.ids == [1, "x", 3]
    assert index.remove("x") == 1 and index.ids == [1, 3]


def test_auto_ids_continue_after_largest_int() -> None:
    index = VectorIndex(2, metric="ip")
    assert index.add(np.ones((3, 2))) == [0, 1, 2]
    assert index.add(np.ones((2, 2)), ids=[10, "ten"]) == [10, "ten"]
    assert index.add(np.ones(2)) == [11]
    index.remove([11, 10])
    # Removed ids are not handed out again.
    assert index.add(np.ones((2, 2))) == [12, 13]
    assert index.add(np.ones(2), ids=[np.int64(5)]) == [5]
    assert type(index.ids[-1]) is int


def test_storage_grows_by_doubling(rng: np.random.Generator) -> None:
    index = VectorIndex(4, metric="ip")
    data = rng.standard_normal((1000, 4)).astype(np.float32)
    capacities = set()
    for row in data:
        index.add(row)
        capacities.add(index._store._data.shape[0])
    # 1000 single adds reallocate only ~log2(1000) times.
    assert len(capacities) <= 8
    np.testing.assert_array_equal(np.stack([index.get(i)[0] for i in range(1000)]), data)


def test_metadata_round_trip(rng: np.random.Generator) -> None:
    index = VectorIndex(3, metric="ip")
    meta = [{"path": "a.jpg", "tags": ["x", "y"], "score": 0.5}, None, {"pair": (1, 2), "nested": {"k": True}}]
    index.add(np.eye(3), ids=["a", "b", "c"], metadata=meta)
    vec, got = index.get("a")
    np.testing.assert_array_equal(vec, [1, 0, 0])
    assert got == meta[0]
    assert index.get("b")[1] is None
    # Stored as its JSON round trip: tuples come back as lists.
    assert index.get("c")[1] == {"pair": [1, 2], "nested": {"k": True}}
    (hits,) = index.search([0.0, 0.0, 1.0], k=1)
    assert hits[0] == Hit("c", 1.0, {"pair": [1, 2], "nested": {"k": True}})
    # get() hands out copies: editing them does not touch the index.
    got["path"] = "changed"
    assert index.get("a")[1]["path"] == "a.jpg"


def test_concurrent_adds_and_searches(rng: np.random.Generator) -> None:
    index = VectorIndex(16)
    index.add(rng.standard_normal((10, 16)))
    batches = [rng.standard_normal((50, 16)) for _ in range(8)]
    errors: list[BaseException] = []

    def work(batch: np.ndarray) -> None:
        try:
            for row in batch:
                index.add(row)
                assert len(index.search(row, k=3)[0]) == 3
        except BaseException as e:  # surfaced below; a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 410 and sorted(index.ids) == list(range(410))


# ---------------------------------------------------------------- empty inputs


def test_empty_index_search_returns_empty_lists() -> None:
    index = VectorIndex(4)
    assert index.search(np.ones((3, 4)), k=5) == [[], [], []]
    assert index.search(np.ones(4)) == [[]]
    assert index.search(np.empty((0, 4))) == []
    # Queries are still checked on an empty index.
    with pytest.raises(InputError, match="expected 4"):
        index.search(np.ones(5))


# ---------------------------------------------------------------- bad input


def _add(index: VectorIndex, *args, **kwargs):
    return lambda: index.add(*args, **kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: VectorIndex(0), "dim must be a positive int"),
        (lambda: VectorIndex(-3), "dim must be a positive int"),
        (lambda: VectorIndex(4.0), "dim must be a positive int"),
        (lambda: VectorIndex(True), "dim must be a positive int"),
        (lambda: VectorIndex(4, metric="l2"), "Unknown metric 'l2'"),
        (lambda: VectorIndex(4).add(np.empty((0, 4))), "vectors is empty"),
        (lambda: VectorIndex(4).add([]), "vectors is empty"),
        (lambda: VectorIndex(4).add(np.ones((2, 2, 4))), "must be 2-D"),
        (lambda: VectorIndex(4).add(np.ones((2, 5))), "dimension 5, expected 4"),
        (lambda: VectorIndex(4).add(np.array([[1, np.nan, 0, 0]])), "NaN or infinite"),
        (lambda: VectorIndex(4).add(np.array([[1, 0, 0, 0], [np.inf, 0, 0, 0]])), r"row\(s\) \[1\]"),
        (lambda: VectorIndex(4).add(np.array([[1e39, 0, 0, 0]])), "too large for float32"),
        (lambda: VectorIndex(4).add(np.array([["a", "b", "c", "d"]])), "must hold real numbers"),
        (lambda: VectorIndex(4).add(np.zeros((1, 4))), "zero norm"),
        (lambda: VectorIndex(4).add(np.ones((2, 4)), ids=[1]), "1 ids for 2 vectors"),
        (lambda: VectorIndex(4).add(np.ones((2, 4)), ids=["a", "a"]), r"duplicates \['a'\]"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), ids=[1.5]), "ids must be int or str"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), ids=[True]), "ids must be int or str"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), ids="a"), "wrap it in a list"),
        (lambda: VectorIndex(4).add(np.ones((2, 4)), metadata=[{}]), "1 metadata entries for 2 vectors"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), metadata={"a": 1}), "wrap it in a list"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), metadata=["x"]), r"metadata\[0\] is a str"),
        (lambda: VectorIndex(4).add(np.ones((2, 4)), metadata=[{}, {"f": object()}]), r"metadata\[1\] is not JSON"),
        (lambda: VectorIndex(4).add(np.ones((1, 4)), metadata=[{"x": float("nan")}]), "not JSON-serialisable"),
        (lambda: VectorIndex(4).search(np.ones((1, 3))), "dimension 3, expected 4"),
        (lambda: VectorIndex(4).search(np.ones((1, 4, 1))), "must be 2-D"),
        (lambda: VectorIndex(4).search(np.array([np.nan] * 4)), "queries contain NaN"),
        (lambda: VectorIndex(4).search(np.zeros(4)), "queries row\\(s\\) \\[0\\] have zero norm"),
        (lambda: VectorIndex(4).search(np.ones(4), k=0), "k must be a positive int"),
        (lambda: VectorIndex(4).search(np.ones(4), k=2.0), "k must be a positive int"),
        (lambda: VectorIndex(4).search(np.ones(4), filter="x"), "filter must be a callable"),
        (lambda: VectorIndex(4).get(0), "Unknown id 0"),
        (lambda: VectorIndex(4).remove([0]), "Unknown id 0"),
    ],
)
def test_bad_input_raises_input_error(call, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError)


def test_ids_already_present_are_rejected_and_nothing_is_added() -> None:
    index = VectorIndex(2, metric="ip")
    index.add(np.ones((2, 2)), ids=["a", 7])
    with pytest.raises(InputError, match=r"ids \[7\] are already in the index"):
        index.add(np.ones((2, 2)), ids=["b", 7])
    assert index.ids == ["a", 7]
    # The same value with another type is a different id.
    assert index.add(np.ones(2), ids=["7"]) == ["7"]


def test_zero_vector_is_fine_for_inner_product() -> None:
    index = VectorIndex(3, metric="ip")
    index.add(np.zeros((1, 3)))
    assert index.search(np.ones(3))[0][0].score == 0.0


# ---------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    index = VectorIndex(20, metric="cosine")
    index.add(rng.standard_normal((300, 20)), metadata=[{"i": i} for i in range(300)])
    index.add(rng.standard_normal((2, 20)), ids=["s", 1000], metadata=[None, {"n": [1, "two"]}])
    index.remove([3, 4])
    path = tmp_path / "index.npz"
    index.save(path)

    loaded = VectorIndex.load(path)
    assert (loaded.dim, loaded.metric, len(loaded)) == (20, "cosine", 300)
    assert loaded.ids == index.ids
    assert [type(i) for i in loaded.ids] == [type(i) for i in index.ids]
    for id_ in ["s", 1000, 0, 299]:
        v1, m1 = index.get(id_)
        v2, m2 = loaded.get(id_)
        np.testing.assert_array_equal(v1, v2)
        assert m1 == m2
    queries = rng.standard_normal((10, 20))
    _assert_same_hits(loaded.search(queries, k=7), index.search(queries, k=7))
    # Auto ids keep counting from where the saved index was.
    assert loaded.add(np.ones(20)) == [1001]
    # Only the used rows are written, not the spare capacity.
    with np.load(path, allow_pickle=False) as npz:
        assert npz["vectors"].shape == (300, 20)
        header = json.loads(npz["header"].tobytes())
    assert (header["format"], header["version"]) == ("edgemm-index", 1)


def test_save_load_empty_index(tmp_path: Path) -> None:
    VectorIndex(5, metric="ip").save(tmp_path / "e.npz")
    loaded = VectorIndex.load(tmp_path / "e.npz")
    assert (len(loaded), loaded.dim, loaded.metric) == (0, 5, "ip")
    assert loaded.search(np.ones(5)) == [[]]


def _write_npz(path: Path, header: dict | None, vectors: np.ndarray) -> None:
    arrays = {"vectors": vectors}
    if header is not None:
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _header(**overrides) -> dict:
    base = {"format": "edgemm-index", "version": 1, "dim": 2, "metric": "ip", "ids": [0], "metadata": [None]}
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("header", "vectors", "message"),
    [
        (None, np.ones((1, 2), np.float32), "expected arrays 'header' and 'vectors'"),
        (_header(format="other"), np.ones((1, 2), np.float32), "format name"),
        (_header(version=2), np.ones((1, 2), np.float32), "version 2.*upgrade edgemm"),
        (_header(dim=3), np.ones((1, 2), np.float32), r"shape \(1, 2\), expected float32 \(N, 3\)"),
        (_header(), np.ones((1, 2), np.float64), "dtype float64"),
        (_header(ids=[0, 1]), np.ones((1, 2), np.float32), "1 vectors but 2 ids"),
        (_header(ids=[0, 0], metadata=[None, None]), np.ones((2, 2), np.float32), "unique"),
        (_header(metric="l1"), np.ones((1, 2), np.float32), "metric 'l1'"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, header, vectors, message: str) -> None:
    path = tmp_path / "bad.npz"
    _write_npz(path, header, vectors)
    with pytest.raises(InputError, match=message):
        VectorIndex.load(path)


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No index file"):
        VectorIndex.load(tmp_path / "missing.npz")
    with pytest.raises(InputError, match="No index file"):
        VectorIndex.load(tmp_path)
    (tmp_path / "text.npz").write_text("not an index")
    with pytest.raises(InputError, match="not a valid edgemm index file"):
        VectorIndex.load(tmp_path / "text.npz")
    np.save(tmp_path / "plain.npy", np.ones(3))
    with pytest.raises(InputError, match="single .npy array"):
        VectorIndex.load(tmp_path / "plain.npy")
    # A file cut short (what a non-atomic writer would leave) is rejected, not half-loaded.
    VectorIndex(4).save(tmp_path / "ok.npz")
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid edgemm index file"):
        VectorIndex.load(tmp_path / "cut.npz")


def test_save_to_missing_directory_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        VectorIndex(2).save(tmp_path / "nope" / "i.npz")
    with pytest.raises(InputError, match="is a directory"):
        VectorIndex(2).save(tmp_path)


def test_failed_save_removes_temp_file_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "i.npz"
    index = VectorIndex(2, metric="ip")
    index.add(np.ones((1, 2)))
    index.save(path)
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    index.add(np.ones((1, 2)))
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(InputError, match="i.npz': disk full") as info:
        index.save(path)
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.npz"]
    assert path.read_bytes() == before


# The child saves a 20000 x 384 index (~30 MB) over the small one and stops at a
# chosen point, telling the parent on stdout; the parent then SIGKILLs it.
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from edgemm._index import VectorIndex

    path, stop_at = sys.argv[1], sys.argv[2]
    index = VectorIndex(384, metric="ip")
    index.add(np.random.default_rng(0).standard_normal((20000, 384), dtype=np.float32))

    def stop():
        print("STOPPED", flush=True)
        time.sleep(60)

    if stop_at == "fsync":
        # All bytes written, not yet renamed.
        os.fsync = lambda fd: stop()
    else:
        # Part-way through the data: wrap the temp file so writes stall after 4 MB.
        real_fdopen = os.fdopen

        class Stalling:
            def __init__(self, f):
                self._f, self._n = f, 0
            def write(self, b):
                n = self._f.write(b)
                self._n += len(b)
                if self._n > 4 * 2**20:
                    self._f.flush()
                    stop()
                return n
            def __getattr__(self, name):
                return getattr(self._f, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        os.fdopen = lambda *a, **k: Stalling(real_fdopen(*a, **k))
    index.save(path)
    print("FINISHED", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
@pytest.mark.parametrize("stop_at", ["mid-write", "fsync"])
def test_save_killed_midway_leaves_previous_file_loadable(
    tmp_path: Path, rng: np.random.Generator, stop_at: str
) -> None:
    path = tmp_path / "index.npz"
    original = VectorIndex(8, metric="cosine")
    original.add(rng.standard_normal((50, 8)), ids=[f"doc{i}" for i in range(50)], metadata=[{"i": i} for i in range(50)])
    original.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), stop_at],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        line = child.stdout.readline().strip()
        assert line == "STOPPED", f"child did not reach the stop point: {line!r} {child.stderr.read()}"
        strays = [p for p in tmp_path.iterdir() if p.name != "index.npz"]
        assert len(strays) == 1 and strays[0].name.startswith(".index.npz.") and strays[0].stat().st_size > 4 * 2**20
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # The killed save left its temp file behind but never touched the real one.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    loaded = VectorIndex.load(path)
    assert loaded.ids == original.ids and len(loaded) == 50
    np.testing.assert_array_equal(loaded.get("doc7")[0], original.get("doc7")[0])
    assert loaded.get("doc7")[1] == {"i": 7}
    query = rng.standard_normal(8)
    _assert_same_hits(loaded.search(query, k=5), original.search(query, k=5))


# ---------------------------------------------------------------- hostile files
#
# Crafted files are built by hand so that their zip directory and .npy headers can
# say anything: a few KB on disk may declare gigabytes.


def _npy(shape: tuple, descr: str = "<f4", fortran: bool = False) -> bytes:
    """A .npy (1.0) header declaring ``shape`` of ``descr``; the data is up to the caller."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def _member(name: str, data: bytes, *, declared: int | None = None) -> tuple:
    """A stored zip member; ``declared`` overrides the uncompressed size the directory claims."""
    return name, data, 0, len(data) if declared is None else declared, zlib.crc32(data)


def _zeros_member(name: str, npy_header: bytes, zero_bytes: int) -> tuple:
    """A deflated member of ``npy_header`` + ``zero_bytes`` zeros, without compressing them all.

    After a full flush a deflate stream no longer refers back, so the compressed
    form of one MiB of zeros can simply be repeated.
    """
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(npy_header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(npy_header)
    for _ in range(zero_bytes // mib):
        crc = zlib.crc32(bytes(mib), crc)
    return name, head + block * (zero_bytes // mib) + c.flush(), 8, len(npy_header) + zero_bytes, crc


def _write_zip(path: Path, members: list[tuple]) -> None:
    """A zip whose directory says exactly what each member tuple claims (name, bytes, method, size, crc)."""
    local, central = b"", b""
    for name, data, method, size, crc in members:
        n = name.encode()
        # version needed, flags, method, time, date (1980-01-01), crc, stored size, declared size
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(data), size)
        # name length, extra, comment, disk, internal and external attributes, offset of the local header
        tail = struct.pack("<HHHHHII", len(n), 0, 0, 0, 0, 0, len(local))
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + tail + n
        local += b"PK\x03\x04" + fields + struct.pack("<HH", len(n), 0) + n + data
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)


def _header_member(header: dict | str) -> tuple:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return _member("header.npy", _npy((len(text),), "|u1") + text)


def _vectors_member(vectors: np.ndarray, **kw) -> tuple:
    return _member("vectors.npy", _npy(vectors.shape) + vectors.astype("<f4").tobytes(), **kw)


def test_load_refuses_an_inflating_bomb_before_inflating_it(tmp_path: Path) -> None:
    # 400 MiB of zeros in a 0.4 MB file, declared as 50M vectors of a 1-vector index.
    # HEAD inflated (and allocated) all of it before comparing with the ids;
    # the 4 GB version of this file took it 33 s and 4.2 GB.
    path = tmp_path / "bomb.npz"
    n = 400 * 2**20 // 8
    _write_zip(path, [_header_member(_header()), _zeros_member("vectors.npy", _npy((n, 2)), 400 * 2**20)])
    assert path.stat().st_size < 2**20

    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match=f"{n} vectors but 1 ids"):
            VectorIndex.load(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"load allocated {peak / 2**20:.0f} MiB before refusing"
    assert elapsed < 0.1


_RAW_DEFLATE = zlib.compress(_npy((1, 2)) + bytes(8))[2:-4]  # without zlib's header and checksum, as zip stores it


@pytest.mark.parametrize(
    ("members", "message"),
    [
        # The directory claims 4 GB from 200 deflated bytes: more than deflate (at most ~1032:1) can give.
        ([_header_member(_header()), ("vectors.npy", _RAW_DEFLATE, 8, 4 * 10**9, zlib.crc32(_npy((1, 2)) + bytes(8)))],
         "declares 4000000000 bytes from .* stored, more than its compression can produce"),
        # The .npy header accounts for 8 bytes of data, the member holds 1000 more.
        ([_header_member(_header()), _member("vectors.npy", _npy((1, 2)) + bytes(1008))],
         r"vectors.npy declares 1136 bytes, but its header and float32 array of shape \(1, 2\) take 136"),
        # A shape that HEAD tried to allocate (8 TiB: a raw MemoryError).
        ([_header_member(_header()), _member("vectors.npy", _npy((2**40, 2)) + bytes(8))],
         r"shape \(1099511627776, 2\) take 8796093022336"),
        ([_header_member(_header(ids=[0, 1], metadata=[None, None])),
          _member("vectors.npy", _npy((2, 2), fortran=True) + np.ones(4, "<f4").tobytes())], "Fortran"),
        # Two members of one name: zipfile would read the last, a zip tool the first.
        ([_header_member(_header()), _vectors_member(np.ones((1, 2))), _vectors_member(np.zeros((1, 2)))],
         r"found \['header.npy', 'vectors.npy', 'vectors.npy'\]"),
        ([_member("header", _header_member(_header())[1]), _member("vectors", _vectors_member(np.ones((1, 2)))[1])],
         r"found \['header', 'vectors'\]"),
        ([_header_member(_header()), ("vectors.npy", b"x" * 16, 12, 16, 0)], "compression method 12"),
    ],
    ids=["deflate-ratio", "trailing-bytes", "huge-shape", "fortran", "duplicate-member", "no-suffix", "bzip2"],
)
def test_load_refuses_sizes_and_members_that_disagree(tmp_path: Path, members: list, message: str) -> None:
    path = tmp_path / "forged.npz"
    _write_zip(path, members)
    with pytest.raises(InputError, match=message):
        VectorIndex.load(path)


def test_load_honours_max_index_bytes_and_max_json_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "i.npz"
    index = VectorIndex(8, metric="ip")
    index.add(np.ones((100, 8)), metadata=[{"i": i} for i in range(100)])
    index.save(path)
    monkeypatch.setattr(LIMITS, "max_index_bytes", 3000)
    with pytest.raises(InputError, match=r"more than edgemm.limits.max_index_bytes \(3000\); raise edgemm.limits"):
        VectorIndex.load(path)
    monkeypatch.setattr(LIMITS, "max_index_bytes", 10**6)
    monkeypatch.setattr(LIMITS, "max_json_bytes", 1000)
    with pytest.raises(InputError, match=r"its header is \d+ bytes, more than edgemm.limits.max_json_bytes \(1000\)"):
        VectorIndex.load(path)
    monkeypatch.setattr(LIMITS, "max_json_bytes", 10**6)
    assert len(VectorIndex.load(path)) == 100


def test_dim_is_bounded_by_max_dim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=f"more than edgemm.limits.max_dim \\({LIMITS.max_dim}\\)"):
        VectorIndex(LIMITS.max_dim + 1)
    VectorIndex(16).save(tmp_path / "i.npz")
    monkeypatch.setattr(LIMITS, "max_dim", 8)
    with pytest.raises(InputError, match="has dim 16, more than edgemm.limits.max_dim .8.; raise"):
        VectorIndex.load(tmp_path / "i.npz")


def _deep(levels: int) -> dict:
    entry: dict = {}
    for _ in range(levels - 1):
        entry = {"a": entry}
    return entry


@pytest.mark.parametrize(
    ("header_text", "message"),
    [
        # 100k nested lists: HEAD's json.loads raised a bare RecursionError.
        (json.dumps(_header())[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
        (json.dumps(_header(metadata=[_deep(65)])), "metadata nests 65 levels deep"),
        (json.dumps(_header(count=3)), "count 3 but it has 1 vectors"),
        (json.dumps(_header(metadata=[{"x": float("nan")}])), "NaN, which is not a JSON number"),
        (json.dumps(_header(metadata=[None, None])), "metadata list has 2 entries"),
        # Two "metric" keys: one reader would search by cosine, another by inner product.
        (json.dumps(_header())[:-1] + ', "metric": "ip"}', "key 'metric' appears twice"),
    ],
    ids=["recursion", "depth-65", "count", "nan", "metadata-length", "duplicate-key"],
)
def test_load_refuses_bad_json_headers(tmp_path: Path, header_text: str, message: str) -> None:
    path = tmp_path / "h.npz"
    _write_zip(path, [_header_member(header_text), _vectors_member(np.ones((1, 2)))])
    with pytest.raises(InputError, match=message):
        VectorIndex.load(path)


def test_metadata_depth_limit_is_the_same_for_add_and_load(tmp_path: Path) -> None:
    index = VectorIndex(2)
    with pytest.raises(InputError, match=r"metadata\[1\] nests 65 levels deep; at most 64"):
        index.add(np.ones((2, 2)), metadata=[None, _deep(65)])
    with pytest.raises(InputError, match="nests too deeply"):
        index.add(np.ones((1, 2)), metadata=[_deep(5000)])
    index.add(np.ones((1, 2)), metadata=[_deep(64)])
    index.save(tmp_path / "i.npz")
    assert VectorIndex.load(tmp_path / "i.npz").get(0)[1] == _deep(64)


def test_load_normalises_foreign_rows_under_cosine(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    unit = np.array([0.6, 0.8], np.float32)
    rows = np.stack([unit * 5, unit, unit * np.float32(1 + 5e-5)])
    _write_zip(path, [_header_member(_header(metric="cosine", ids=["far", "unit", "near"], metadata=[None] * 3)),
                      _vectors_member(rows)])
    index = VectorIndex.load(path)
    np.testing.assert_allclose(index.get("far")[0], unit, rtol=1e-6)
    # Rows within 1e-4 of unit norm keep their exact bits (a saved index round-trips exactly).
    np.testing.assert_array_equal(index.get("unit")[0], unit)
    np.testing.assert_array_equal(index.get("near")[0], rows[2])
    assert max(h.score for h in index.search(unit, k=3)[0]) <= 1 + 1e-4


@pytest.mark.parametrize(
    ("metric", "row", "message"),
    [
        ("cosine", [0.0, 0.0], r"vector 1 \(id 'b'\) has zero norm"),
        ("ip", [np.nan, 1.0], r"vector 1 \(id 'b'\) has NaN or infinite values"),
        ("cosine", [np.inf, 1.0], r"vector 1 \(id 'b'\) has NaN or infinite values"),
    ],
)
def test_load_refuses_rows_naming_them(tmp_path: Path, metric: str, row: list, message: str) -> None:
    path = tmp_path / "r.npz"
    vectors = np.array([[1.0, 0.0], row], np.float32)
    _write_zip(path, [_header_member(_header(metric=metric, ids=["a", "b"], metadata=[None, None])),
                      _vectors_member(vectors)])
    with pytest.raises(InputError, match=message):
        VectorIndex.load(path)


def test_corrupted_compressed_files_raise_only_input_error(tmp_path: Path, rng: np.random.Generator) -> None:
    # A foreign writer may deflate its members (np.savez_compressed); flipping bytes of
    # such a file reaches zlib, zipfile and numpy's header parser in many ways.
    index = VectorIndex(4)
    index.add(rng.standard_normal((6, 4)), metadata=[{"i": i} for i in range(6)])
    header = {"format": "edgemm-index", "version": 1, "dim": 4, "metric": "cosine", "ids": index.ids,
              "metadata": [index.get(i)[1] for i in index.ids]}
    buf = io.BytesIO()
    np.savez_compressed(buf, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                        vectors=np.stack([index.get(i)[0] for i in index.ids]))
    good = buf.getvalue()
    path = tmp_path / "z.npz"
    path.write_bytes(good)
    assert VectorIndex.load(path).ids == index.ids
    outcomes = set()
    for pos in range(len(good)):
        for flip in (0x01, 0x80):
            path.write_bytes(good[:pos] + bytes([good[pos] ^ flip]) + good[pos + 1 :])
            try:
                VectorIndex.load(path)
                outcomes.add("loaded")
            except InputError as e:
                assert str(path) in str(e)
                outcomes.add("refused")
    assert outcomes == {"loaded", "refused"}


_LOW_MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from edgemm._index import VectorIndex

    # Room for the interpreter and numpy as they are now, plus 256 MiB.
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
    try:
        VectorIndex.load(sys.argv[1])
    except BaseException as e:
        print(type(e).__name__, e)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_AS as Linux enforces it")
def test_load_out_of_memory_is_input_error(tmp_path: Path) -> None:
    # A consistent, 0.5 MB file of 4096 x 32768 zeros: 512 MiB, more than the child may allocate.
    path = tmp_path / "big.npz"
    n, dim = 4096, 32768
    header = _header(dim=dim, ids=list(range(n)), metadata=[None] * n)
    _write_zip(path, [_header_member(header), _zeros_member("vectors.npy", _npy((n, dim)), n * dim * 4)])
    child = subprocess.run([sys.executable, "-c", _LOW_MEMORY_CHILD, str(path)], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=60)
    assert child.stdout.startswith(f"InputError Not enough memory to load the index {str(path)!r}"), (
        child.stdout + child.stderr)
