"""VectorIndex(kind="hnsw"): the same API as the exact kind, measured recall, its file format and hostile files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("faiss")

import edgemm._ann as ann  # noqa: E402
from edgemm import HnswOptions, Hit, VectorIndex  # noqa: E402
from edgemm.runtime.errors import InputError, MissingDependencyError  # noqa: E402
from edgemm.runtime.limits import LIMITS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ["exact", "hnsw"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian mixture of unit vectors, queries held out from the same mixture (as real embeddings cluster)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((50, dim)))
    label = rng.integers(0, 50, n + n_queries)
    spread = rng.uniform(0.8, 1.6, (n + n_queries, 1)) / np.sqrt(dim)
    x = _unit(centres[label] + spread * rng.standard_normal((n + n_queries, dim))).astype(np.float32)
    return x[:n], x[n:]


def _ids(results: list[list[Hit]]) -> list[list]:
    return [[h.id for h in hits] for hits in results]


def _recall(found: list[list], truth: list[list]) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# ---------------------------------------------------------------- the same API for both kinds


@pytest.mark.parametrize("kind", KINDS)
def test_ids_keep_their_type_and_auto_ids_are_never_reused(kind: str, tmp_path: Path) -> None:
    index = VectorIndex(4, metric="ip", kind=kind)
    assert index.add(np.eye(4)[:3]) == [0, 1, 2]
    assert index.add(np.eye(4)[:2] + 1, ids=[10, "10"]) == [10, "10"]
    assert 10 in index and "10" in index and 10.0 not in index and True not in index
    assert index.add(np.ones(4)) == [11]
    index.remove([11, 10])
    index.save(tmp_path / "i.idx")
    loaded = VectorIndex.load(tmp_path / "i.idx")
    assert loaded.kind == kind
    assert loaded.ids == [0, 1, 2, "10"] and [type(i) for i in loaded.ids] == [int, int, int, str]
    assert loaded.add(np.ones(4)) == [12]  # 10 and 11 were used, so they are not handed out again


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_is_its_json_round_trip_and_get_returns_copies(kind: str, tmp_path: Path) -> None:
    index = VectorIndex(3, metric="ip", kind=kind)
    index.add(np.eye(3), ids=["a", "b", "c"], metadata=[{"pair": (1, 2)}, None, {"n": {"k": True}}])
    vec, meta = index.get("a")
    np.testing.assert_array_equal(vec, [1, 0, 0])
    assert meta == {"pair": [1, 2]} and index.get("b")[1] is None
    meta["pair"] = "changed"
    assert index.get("a")[1] == {"pair": [1, 2]}
    (hits,) = index.search([0.0, 0.0, 1.0], k=1)
    assert hits[0].id == "c" and hits[0].metadata == {"n": {"k": True}} and hits[0].score == pytest.approx(1.0)
    index.save(tmp_path / "m.idx")
    assert VectorIndex.load(tmp_path / "m.idx").get("a")[1] == {"pair": [1, 2]}


@pytest.mark.parametrize("kind", KINDS)
def test_remove_is_all_or_nothing_and_removed_vectors_are_never_found(kind: str, rng: np.random.Generator) -> None:
    data, queries = _clustered(1500, 24, 20)
    index = VectorIndex(24, kind=kind)
    index.add(data)
    with pytest.raises(InputError, match="Unknown id 'nope'"):
        index.remove([1, "nope"])
    with pytest.raises(InputError, match="duplicates"):
        index.remove([3, 3])
    assert len(index) == 1500
    # Remove every query's best hits, so a stale graph node would show up.
    best = {h.id for hits in index.search(queries, k=5) for h in hits}
    gone = best | set(rng.choice(1500, 600, replace=False).tolist())
    assert index.remove(sorted(gone)) == len(gone)
    found = {h.id for hits in index.search(queries, k=10) for h in hits}
    assert not found & gone and len(index) == 1500 - len(gone)
    assert all(len(hits) == 10 for hits in index.search(queries, k=10))
    index.remove(index.ids)
    assert len(index) == 0 and index.search(queries[:2]) == [[], []]
    assert index.add(data[:3]) == [1500, 1501, 1502]
    assert [h.id for h in index.search(data[0], k=1)[0]] == [1500]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_the_same_hits(kind: str, tmp_path: Path) -> None:
    data, queries = _clustered(2000, 32, 30)
    index = VectorIndex(32, kind=kind)
    index.add(data, ids=[f"doc{i}" for i in range(2000)], metadata=[{"i": i} for i in range(2000)])
    index.remove(["doc5", "doc6"])
    index.save(tmp_path / "r.idx")
    loaded = VectorIndex.load(tmp_path / "r.idx")
    assert (loaded.dim, loaded.metric, loaded.kind, len(loaded)) == (32, "cosine", kind, 1998)
    assert loaded.ids == index.ids
    np.testing.assert_array_equal(loaded.get("doc7")[0], index.get("doc7")[0])
    before, after = index.search(queries, k=7), loaded.search(queries, k=7)
    assert _ids(after) == _ids(before)
    np.testing.assert_allclose([h.score for r in after for h in r], [h.score for r in before for h in r], atol=1e-6)
    assert loaded.hnsw == index.hnsw


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_searches_saves_and_loads(kind: str, tmp_path: Path) -> None:
    index = VectorIndex(5, metric="ip", kind=kind)
    assert index.search(np.ones((3, 5))) == [[], [], []] and index.search(np.empty((0, 5))) == []
    with pytest.raises(InputError, match="expected 5"):
        index.search(np.ones(4))
    index.save(tmp_path / "e.idx")
    loaded = VectorIndex.load(tmp_path / "e.idx")
    assert (len(loaded), loaded.kind, loaded.search(np.ones(5))) == (0, kind, [[]])
    assert loaded.add(np.ones(5)) == [0]


@pytest.mark.parametrize(("kind", "path"), [("exact", "scan"), ("hnsw", "scan"), ("hnsw", "over-fetch")])
def test_filtered_search_returns_k_matching_hits_when_they_exist(kind: str, path: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "over-fetch":
        monkeypatch.setattr(ann, "_EXACT_FILTER_ROWS", 0)  # walk the graph even for a handful of matches
    data, queries = _clustered(3000, 32, 10)
    index = VectorIndex(32, kind=kind)
    index.add(data, metadata=[{"shard": i % 100} for i in range(3000)])
    exact = VectorIndex(32)
    exact.add(data, metadata=[{"shard": i % 100} for i in range(3000)])
    for keep in ({3}, {3, 50}, set(range(40))):  # 1%, 2% and 40% of the vectors match
        def wanted(m: dict | None, keep: set = keep) -> bool:
            return m["shard"] in keep

        results = index.search(queries, k=10, filter=wanted)
        assert all(len(hits) == 10 and all(wanted(h.metadata) for h in hits) for hits in results)
        assert _recall(_ids(results), _ids(exact.search(queries, k=10, filter=wanted))) >= 0.95
    assert index.search(queries[:2], k=10, filter=lambda m: False) == [[], []]


def test_filter_with_fewer_matches_than_k_returns_all_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ann, "_EXACT_FILTER_ROWS", 0)
    data, queries = _clustered(3000, 32, 5)
    index = VectorIndex(32, kind="hnsw")
    index.add(data, metadata=[{"i": i} for i in range(3000)])
    keep = {17, 940, 2999, 1234}
    for hits in index.search(queries, k=10, filter=lambda m: m["i"] in keep):
        assert {h.id for h in hits} == keep
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.parametrize("kind", KINDS)
def test_rerank_rescores_the_vector_hits(kind: str) -> None:
    data, queries = _clustered(500, 16, 3)
    index = VectorIndex(16, kind=kind)
    index.add(data)

    def negated(q: int, vectors: np.ndarray, hits: list) -> np.ndarray:
        np.testing.assert_allclose(vectors @ queries[q], [h.score for h in hits], atol=1e-5)
        return -np.array([h.score for h in hits])

    plain = index.search(queries, k=20)
    reranked = index.search(queries, k=5, rerank=20, reranker=negated)
    assert _ids(reranked) == [ids[::-1][:5] for ids in _ids(plain)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda i: i.add(np.ones((2, 5))), "dimension 5, expected 4"),
        (lambda i: i.add(np.array([[1, np.nan, 0, 0]])), "NaN or infinite"),
        (lambda i: i.add(np.zeros((1, 4))), "zero norm"),
        (lambda i: i.add(np.ones((2, 4)), ids=["a", "a"]), r"duplicates \['a'\]"),
        (lambda i: i.add(np.ones((1, 4)), ids=[True]), "ids must be int or str"),
        (lambda i: i.add(np.ones((1, 4)), metadata=[{"f": object()}]), r"metadata\[0\] is not JSON"),
        (lambda i: i.add(np.empty((0, 4))), "vectors is empty"),
        (lambda i: i.search(np.zeros(4)), "have zero norm"),
        (lambda i: i.search(np.ones(4), k=0), "k must be a positive int"),
        (lambda i: i.search(np.ones(4), filter="x"), "filter must be a callable"),
        (lambda i: i.search(np.ones(4), k=2, rerank=1, reranker=lambda *a: 0), "rerank must be an int ≥ k"),
        (lambda i: i.search(np.ones(4), ef_search=0), "ef_search must be a positive int"),
        (lambda i: i.get("x"), "Unknown id 'x'"),
        (lambda i: i.remove(["x"]), "Unknown id 'x'"),
    ],
)
def test_both_kinds_refuse_bad_input_alike(kind: str, call, message: str) -> None:
    index = VectorIndex(4, kind=kind)
    index.add(np.eye(4), ids=[1, 2, 3, 4])
    with pytest.raises(InputError, match=message):
        call(index)
    assert index.ids == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(kind: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "i.idx"
    index = VectorIndex(2, metric="ip", kind=kind)
    index.add(np.ones((1, 2)))
    index.save(path)
    before = path.read_bytes()
    index.add(np.ones((1, 2)))

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(InputError, match="i.idx': disk full"):
        index.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.idx"]
    assert path.read_bytes() == before and len(VectorIndex.load(path)) == 1


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from edgemm import VectorIndex

    index = VectorIndex(64, metric="ip", kind="hnsw")
    index.add(np.random.default_rng(0).standard_normal((3000, 64), dtype=np.float32))
    def stop(fd):
        print("STOPPED", flush=True)
        time.sleep(60)
    os.fsync = stop  # every byte written, not yet renamed
    index.save(sys.argv[1])
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_a_save_killed_before_its_rename_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "i.idx"
    original = VectorIndex(64, metric="ip", kind="hnsw")
    original.add(np.ones((3, 64)), ids=["a", "b", "c"])
    original.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        line = child.stdout.readline().strip()
        assert line == "STOPPED", child.stderr.read()
        (temp,) = [p for p in tmp_path.iterdir() if p.name != "i.idx"]
        assert temp.name.startswith(".i.idx.") and temp.stat().st_size > 3000 * 64 * 4
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert VectorIndex.load(path).ids == ["a", "b", "c"]
    original.save(path)  # the next save clears the killed one's temp file
    assert [p.name for p in tmp_path.iterdir()] == ["i.idx"]


# ---------------------------------------------------------------- what only the hnsw kind has


def test_recall_on_clustered_vectors_meets_the_measured_bound() -> None:
    # Measured on 3 seeds (4000 x 48, 50 clusters): 0.9975-0.9985 at the default ef_search 64, 0.90-0.95 at 10.
    data, queries = _clustered(4000, 48, 200, seed=3)
    exact = VectorIndex(48)
    exact.add(data)
    truth = _ids(exact.search(queries, k=10))
    index = VectorIndex(48, kind="hnsw")
    index.add(data)
    default = _recall(_ids(index.search(queries, k=10)), truth)
    low = _recall(_ids(index.search(queries, k=10, ef_search=10)), truth)
    assert default >= 0.99
    assert low < default  # ef_search per call really changes the search


def test_options_are_checked_and_kept() -> None:
    options = HnswOptions(connectivity=8, ef_construction=40, ef_search=20)
    index = VectorIndex(8, kind="hnsw", hnsw=options)
    assert index.hnsw == options and VectorIndex(8).hnsw is None
    assert repr(index) == "VectorIndex(dim=8, metric='cosine', kind='hnsw', size=0)"
    for bad, message in [({"connectivity": 1}, "connectivity must be an int from 2 to 256"),
                         ({"ef_search": 0}, "ef_search must be an int from 1"),
                         ({"ef_construction": 2.5}, "ef_construction must be an int")]:
        with pytest.raises(InputError, match=message):
            HnswOptions(**bad)
    with pytest.raises(InputError, match="hnsw= options apply to kind='hnsw'"):
        VectorIndex(8, hnsw=options)
    with pytest.raises(InputError, match="Unknown kind 'ivf'"):
        VectorIndex(8, kind="ivf")
    with pytest.raises(InputError, match="ef_search applies to approximate indexes"):
        VectorIndex(8).search(np.ones(8), ef_search=10)


def test_memory_mapped_file_searches_alike_and_is_read_only(tmp_path: Path) -> None:
    data, queries = _clustered(3000, 32, 20)
    index = VectorIndex(32, kind="hnsw")
    index.add(data, metadata=[{"i": i} for i in range(3000)])
    index.save(tmp_path / "h.idx")
    mapped = VectorIndex.load(tmp_path / "h.idx", mmap=True)
    loaded = VectorIndex.load(tmp_path / "h.idx")
    assert mapped.read_only and not loaded.read_only
    assert _ids(mapped.search(queries, k=10)) == _ids(loaded.search(queries, k=10))
    assert mapped.search(queries[0], k=3, filter=lambda m: m["i"] < 100)[0][0].metadata["i"] < 100
    np.testing.assert_array_equal(mapped.get(5)[0], loaded.get(5)[0])
    for change in (lambda: mapped.add(data[:1]), lambda: mapped.remove([1])):
        with pytest.raises(InputError, match="read-only from a memory-mapped file"):
            change()
    assert len(mapped) == 3000
    # Saving a mapped index (even over its own file) writes a new file; the map keeps the old one.
    mapped.save(tmp_path / "h.idx")
    assert _ids(VectorIndex.load(tmp_path / "h.idx").search(queries, k=10)) == _ids(loaded.search(queries, k=10))
    assert len(mapped.search(queries, k=10)[0]) == 10


def test_mmap_of_an_exact_file_is_refused(tmp_path: Path) -> None:
    VectorIndex(4).save(tmp_path / "e.idx")
    with pytest.raises(InputError, match="is an exact index.*Load it without mmap"):
        VectorIndex.load(tmp_path / "e.idx", mmap=True)


def test_tombstones_are_never_found_survive_save_load_and_are_rebuilt_away(tmp_path: Path) -> None:
    data, queries = _clustered(600, 16, 10)
    index = VectorIndex(16, kind="hnsw")
    index.add(data)
    index.remove(list(range(0, 600, 5)))  # 120 tombstones: fewer than the live vectors, so they stay
    assert index._store._index.ntotal == 600
    index.save(tmp_path / "t.idx")
    loaded = VectorIndex.load(tmp_path / "t.idx")
    assert loaded.ids == index.ids and loaded._store._index.ntotal == 600
    for hits in loaded.search(queries, k=20) + loaded.search(queries, k=20, filter=lambda m: True):
        assert len(hits) == 20 and all(h.id % 5 for h in hits)
    loaded.remove([i for i in loaded.ids if i % 5 != 4])  # now most slots are dead: the graph is rebuilt
    assert loaded._store._index.ntotal == len(loaded) == 120
    assert {h.id for h in loaded.search(queries, k=120)[0]} == set(range(4, 600, 5))
    np.testing.assert_array_equal(loaded.get(9)[0], index.get(9)[0])


def test_without_faiss_one_error_names_the_extra(tmp_path: Path) -> None:
    index = VectorIndex(4, kind="hnsw")
    index.add(np.eye(4))
    index.save(tmp_path / "h.idx")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["faiss"] = None  # as if it were not installed
        from edgemm import VectorIndex, MissingDependencyError
        for make in (lambda: VectorIndex(4, kind="hnsw"), lambda: VectorIndex.load({str(tmp_path / "h.idx")!r})):
            try:
                make()
            except MissingDependencyError as e:
                print("MISSING", e)
        VectorIndex(4).add([[1, 0, 0, 0]])  # the exact kind needs nothing
        print("EXACT OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    lines = out.stdout.splitlines()
    assert len([line for line in lines if line.startswith("MISSING")]) == 2, out.stdout + out.stderr
    assert all("pip install 'edgemm[ann]'" in line for line in lines if line.startswith("MISSING"))
    assert lines[-1] == "EXACT OK"
    assert issubclass(MissingDependencyError, ImportError)


# ---------------------------------------------------------------- the file format and hostile files


def _saved(tmp_path: Path, n: int = 40, dim: int = 8, metric: str = "cosine") -> tuple[Path, bytes]:
    index = VectorIndex(dim, metric=metric, kind="hnsw", hnsw=HnswOptions(connectivity=4, ef_construction=16))
    rng = np.random.default_rng(0)
    index.add(rng.standard_normal((n, dim)), ids=[f"v{i}" for i in range(n)], metadata=[{"i": i} for i in range(n)])
    index.remove(["v3"])  # one tombstone
    path = tmp_path / "good.idx"
    index.save(path)
    return path, path.read_bytes()


def _parts(data: bytes) -> tuple[bytes, dict, tuple]:
    footer = ann.FOOTER.unpack(data[-ann.FOOTER.size :])
    blob_len, header_len = footer[0], footer[1]
    return data[:blob_len], json.loads(data[blob_len : blob_len + header_len]), footer


def _assemble(blob: bytes, header: dict | bytes, version: int = 1) -> bytes:
    """A file with correct checksums around whatever blob and header it is given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return blob + text + ann.FOOTER.pack(len(blob), len(text), zlib.crc32(blob), zlib.crc32(text), version, 0,
                                         ann.MAGIC)


def _layout(blob: bytes) -> dict[str, Any]:
    """Where each field of FAISS's IndexHNSWFlat serialisation starts (a vector's offset is its u64 count's)."""
    where: dict[str, Any] = {"d": 4, "ntotal": 8, "trained": 32, "metric": 33}
    at = 37
    for name, item in [("probas", 8), ("cum", 4), ("levels", 4), ("offsets", 8), ("neighbours", 4)]:
        where[name] = at
        at += 8 + struct.unpack_from("<Q", blob, at)[0] * item
    where["entry"], where["top"], where["ef_construction"], where["ef_search"] = at, at + 4, at + 8, at + 12
    where["storage"] = at + 20
    where["storage_ntotal"] = at + 20 + 8
    where["codes"] = at + 20 + 37
    n = struct.unpack_from("<q", blob, 8)[0]
    where["n"] = n
    where["level_of"] = np.frombuffer(blob, "<i4", n, where["levels"] + 8)
    where["cum_of"] = np.frombuffer(blob, "<i4", struct.unpack_from("<Q", blob, where["cum"])[0], where["cum"] + 8)
    where["offset_of"] = np.frombuffer(blob, "<u8", n + 1, where["offsets"] + 8)
    return where


def _link(where: dict, node: int, level: int) -> int:
    """Offset of the first neighbour slot of ``node`` on ``level``."""
    return where["neighbours"] + 8 + 4 * int(where["offset_of"][node] + where["cum_of"][level])


def test_file_layout_is_the_faiss_blob_then_header_then_footer(tmp_path: Path) -> None:
    _, data = _saved(tmp_path)
    blob, header, footer = _parts(data)
    assert footer[-1] == b"edgemmHN" and footer[4] == 1 and blob[:4] == b"IHNf"
    assert (header["format"], header["kind"], header["dim"], header["count"]) == ("edgemm-index", "hnsw", 8, 39)
    assert header["hnsw"] == {"connectivity": 4, "ef_construction": 16, "ef_search": 64}
    assert header["dead_slots"] == [3]
    where = _layout(blob)
    assert where["n"] == 40 and blob[where["storage"] : where["storage"] + 4] == b"IxFI"
    assert where["codes"] + 8 + 40 * 8 * 4 == len(blob)


def test_every_truncation_and_every_flipped_byte_is_refused(tmp_path: Path) -> None:
    _, data = _saved(tmp_path, n=30)
    bad = tmp_path / "bad.idx"
    for cut in sorted({0, 1, 5, 39, 40, 41, len(data) - 41, len(data) - 40, len(data) - 1}
                      | set(range(0, len(data), 97))):
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a valid edgemm index file"):
            VectorIndex.load(bad)
    for pos in range(len(data)):
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :])
        with pytest.raises(InputError) as info:
            VectorIndex.load(bad)
        assert str(bad) in str(info.value)


def _forged(tmp_path: Path, mutate) -> Path:
    """The good file with ``mutate(blob: bytearray, header: dict, where: dict)`` applied and checksums redone."""
    _, data = _saved(tmp_path)
    blob, header, _ = _parts(data)
    where = _layout(blob)
    blob = bytearray(blob)
    mutate(blob, header, where)
    path = tmp_path / "forged.idx"
    path.write_bytes(_assemble(bytes(blob), header))
    return path


def _put(blob: bytearray, fmt: str, offset: int, *values) -> None:
    struct.pack_into(fmt, blob, offset, *values)


def _first_upper_node(where: dict) -> int:
    return int(np.flatnonzero(where["level_of"] > 1)[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b, h, w: b.__setitem__(slice(0, 4), b"IHNp"), r"does not hold an HNSW index \(IHNf\)"),
        (lambda b, h, w: _put(b, "<i", w["d"], 9), "has dimension 9"),
        (lambda b, h, w: _put(b, "<i", w["metric"], 1), "and metric 1; expected dimension 8, inner product"),
        (lambda b, h, w: _put(b, "<B", w["trained"], 2), "trained=2"),
        (lambda b, h, w: _put(b, "<q", w["ntotal"], 10**12), "40 levels and 41 offsets for 1000000000000 nodes"),
        # A declared length FAISS would try to allocate before reading it.
        (lambda b, h, w: _put(b, "<Q", w["probas"], 2**60), "declares 1152921504606846976 entries, more than"),
        (lambda b, h, w: _put(b, "<i", w["cum"] + 12, 99), "level tables are not those of a graph of connectivity 4"),
        (lambda b, h, w: _put(b, "<i", w["levels"] + 8, 0), "node levels are out of range"),
        (lambda b, h, w: _put(b, "<i", w["levels"] + 8 + 4 * int(np.flatnonzero(w["level_of"] == 1)[0]), 2),
         "offsets do not match the node levels"),
        (lambda b, h, w: _put(b, "<Q", w["offsets"] + 16, int(w["offset_of"][1]) + 1),
         "offsets do not match the node levels"),
        (lambda b, h, w: _put(b, "<i", _link(w, 0, 0), 2**31 - 1), "link points outside the graph's 40 nodes"),
        (lambda b, h, w: _put(b, "<i", _link(w, 0, 0), -2), "link points outside the graph's 40 nodes"),
        (lambda b, h, w: _put(b, "<i", w["entry"], 40), "entry node 40 or top level .* is out of range"),
        (lambda b, h, w: _put(b, "<i", w["top"], 9), "entry node .* or top level 9 is out of range"),
        (lambda b, h, w: _put(b, "<i", w["ef_search"], 7), "ef_construction / ef_search disagree"),
        (lambda b, h, w: b.__setitem__(slice(w["storage"], w["storage"] + 4), b"IxF2"),
         r"does not hold an flat storage \(IxFI\)"),
        (lambda b, h, w: _put(b, "<q", w["storage_ntotal"], 39), "storage and graph hold different numbers"),
        (lambda b, h, w: _put(b, "<Q", w["codes"], 40 * 8 - 1), "storage holds 319 floats for 40 vectors"),
        (lambda b, h, w: b.extend(b"\0" * 16), "16 bytes after the index"),
        (lambda b, h, w: _put(b, "<f", w["codes"] + 8, float("nan")), "vector slot 0 is not a unit vector"),
        (lambda b, h, w: _put(b, "<f", w["codes"] + 8, 3.0), "vector slot 0 is not a unit vector"),
        (lambda b, h, w: h.update(dead_slots=[]), "40 slots, but the header lists 39 vectors and 0 removed"),
        (lambda b, h, w: h.update(dead_slots=[40]), "removed slots must be from 0 to 39"),
        (lambda b, h, w: h.update(dead_slots=["3"]), "'dead_slots', a list of ints"),
        (lambda b, h, w: h.update(hnsw={"connectivity": 4}), "needs 'hnsw'"),
        (lambda b, h, w: h.update(hnsw={"connectivity": 5, "ef_construction": 16, "ef_search": 64}),
         "not those of a graph of connectivity 5"),
        (lambda b, h, w: h.update(hnsw={"connectivity": 4, "ef_construction": 16, "ef_search": 0}),
         "hnsw options are out of range"),
        (lambda b, h, w: h.update(kind="exact"), "says kind 'exact'"),
        (lambda b, h, w: h.update(count=5), "count 5 but it has 39"),
        (lambda b, h, w: h.update(dim=9), "dimension 8, 40 vectors.*expected dimension 9"),
    ],
    ids=["fourcc", "d", "metric", "trained", "ntotal", "huge-vector", "level-table", "level-zero", "level-raised",
         "offsets", "link-past", "link-negative", "entry", "top", "ef", "storage-fourcc", "storage-ntotal",
         "codes-size", "trailing", "nan", "not-unit", "dead-count", "dead-range", "dead-type", "options",
         "options-mismatch", "options-range", "kind", "count-header", "dim-header"],
)
def test_forged_files_with_valid_checksums_are_refused_before_faiss_reads_them(tmp_path: Path, mutate,
                                                                               message: str) -> None:
    with pytest.raises(InputError, match=message):
        VectorIndex.load(_forged(tmp_path, mutate))


def test_a_link_to_a_node_below_the_links_level_is_refused(tmp_path: Path) -> None:
    # FAISS's own reader accepts this one; its search would read that node's list past its end.
    def mutate(blob: bytearray, header: dict, where: dict) -> None:
        ground = int(np.flatnonzero(where["level_of"] == 1)[0])
        _put(blob, "<i", _link(where, _first_upper_node(where), 1), ground)

    with pytest.raises(InputError, match="level-1 link points to a node below that level"):
        VectorIndex.load(_forged(tmp_path, mutate))


def test_footer_sizes_limits_and_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = _saved(tmp_path)
    blob, header, _ = _parts(data)
    bad = tmp_path / "b.idx"
    bad.write_bytes(data + b"x")
    with pytest.raises(InputError, match="no edgemm footer"):
        VectorIndex.load(bad)
    bad.write_bytes(data[:-ann.FOOTER.size] + ann.FOOTER.pack(len(blob) + 5, 10, 0, 0, 1, 0, ann.MAGIC))
    with pytest.raises(InputError, match="cut short, or something appended"):
        VectorIndex.load(bad)
    bad.write_bytes(_assemble(blob, header, version=2))
    with pytest.raises(InputError, match="format version 2, but this edgemm reads up to version 1; upgrade"):
        VectorIndex.load(bad)
    bad.write_bytes(_assemble(blob, b'{"format": "edgemm-index", "format": "x"}'))
    with pytest.raises(InputError, match="key 'format' appears twice"):
        VectorIndex.load(bad)
    for limit, value in [("max_json_bytes", 100), ("max_index_bytes", 1000)]:
        with monkeypatch.context() as patch:
            patch.setattr(LIMITS, limit, value)
            with pytest.raises(InputError, match=rf"more than edgemm.limits.{limit} \({value}\); raise"):
                VectorIndex.load(path)
    assert len(VectorIndex.load(path)) == 39
    (tmp_path / "text.idx").write_text("not an index at all, long enough for a footer" * 2)
    with pytest.raises(InputError, match="neither an .npz archive nor an edgemm HNSW file"):
        VectorIndex.load(tmp_path / "text.idx")


_FUZZ_CHILD = textwrap.dedent(
    """
    import json, sys, zlib
    import numpy as np
    import edgemm._ann as ann
    from edgemm import VectorIndex, InputError

    data = open(sys.argv[1], "rb").read()
    footer = ann.FOOTER.unpack(data[-ann.FOOTER.size:])
    blob, text = data[: footer[0]], data[footer[0] : footer[0] + footer[1]]
    graph_end = len(blob) - 8 - 40 * 8 * 4  # where the stored vectors start
    rng = np.random.default_rng(int(sys.argv[2]))
    out = sys.argv[1] + ".case"
    for case in range(300):
        b = bytearray(blob)
        # Most mutations land in the graph (before the 40 x 8 float32 vectors), where a bad link would crash.
        for pos in rng.integers(0, graph_end if case % 4 else len(b), rng.integers(1, 4)):
            b[pos] = int(rng.integers(0, 256))
        b = bytes(b)
        open(out, "wb").write(b + text + ann.FOOTER.pack(len(b), len(text), zlib.crc32(b), zlib.crc32(text), 1, 0,
                                                         ann.MAGIC))
        try:
            index = VectorIndex.load(out, mmap=bool(case % 2))
            index.search(np.ones((3, 8)), k=5)
            index.search(np.ones(8), k=39, filter=lambda m: m["i"] % 2 == 0)
            print("loaded", flush=True)
        except InputError:
            print("refused", flush=True)
    """
)


def test_randomly_damaged_graphs_with_valid_checksums_never_crash_the_interpreter(tmp_path: Path) -> None:
    # A crash (segfault, or a FAISS assertion's abort) would kill the child: its exit status and last case show it.
    path, _ = _saved(tmp_path)
    child = subprocess.run([sys.executable, "-c", _FUZZ_CHILD, str(path), "11"],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    outcomes = child.stdout.split()
    assert child.returncode == 0, f"child died ({child.returncode}) after {len(outcomes)} cases: {child.stderr}"
    assert len(outcomes) == 300 and set(outcomes) == {"loaded", "refused"}
