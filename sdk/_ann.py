"""The approximate kind of ``VectorIndex``: a FAISS HNSW graph (``IndexHNSWFlat``), saved in one checked file.

FAISS was chosen over usearch by measurement (``benchmarks/ann_choice.py``,
``benchmarks/results/index-ann-choice.md``, 2 cores, 384-d clustered vectors):
the same recall at every ``ef_search``, but 1.35-1.9x usearch's queries/s at 200k
vectors and 2.6x at 1M, builds twice as fast, and the same memory, file size and
memory-mapped search. FAISS's HNSW cannot remove vectors, which usearch can: so
here a removed vector becomes a tombstone. Its slot stays in the graph (still a
stepping stone for the search, never a result: searches hand FAISS a bitmap of the
live slots) until more than half of the slots are dead, when the graph is rebuilt
from the live vectors (an amortised cost, as a growing array's copies are).

FAISS numbers its vectors 0, 1, 2, ... in the order they were added (slots); rows
of the index are the live slots in that order, so ``_slots`` (row -> slot) is
increasing and ``_row_of_slot`` (slot -> row, -1 for a tombstone) inverts it.

A file is three parts (little-endian)::

    [FAISS blob: what faiss.write_index writes for an IndexHNSWFlat]
    [JSON header: the exact kind's fields, plus "kind", "dead_slots" and "hnsw" (the options)]
    [footer, 40 bytes: blob length u64, header length u64, CRC-32 of the blob u32 and of the header u32,
     format version u32, zero u32, magic b"edgemmHN"]

FAISS 1.14 and later check much of a graph they read, but not everything its search
dereferences (a link on an upper level to a node that does not reach that level), and
some of its failures abort the process rather than raise. So ``read_hnsw`` checks the
checksums and then, with numpy, every size, array and link of the blob before FAISS
reads a byte, and FAISS then reads the very file that was checked (``/proc/self/fd``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap as mmap_module
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edgemm._files import atomic_write
from edgemm._index import FORMAT_VERSION, HnswOptions, Store, check_counts, exact_top_k, grown, not_index, parse_header
from edgemm.runtime.errors import InputError, require
from edgemm.runtime.limits import LIMITS

FOOTER = struct.Struct("<QQIIII8s")
MAGIC = b"edgemmHN"
_CHECK_ROWS = 1 << 14  # vectors one step of the vector check reads
_NORM_TOLERANCE = 1e-3  # under cosine, stored rows are unit vectors; float32 sums of squares stay this close

# Filtered search: with at most this many matches, scanning them exactly beats walking the graph
# (20k x 384 is about 1 ms per query here, an HNSW search at ef 64 about 0.4 ms).
_EXACT_FILTER_ROWS = 20_000
# The most ef_search a graph search uses: a filter's search is widened by total / matches up to it (rarer matches
# are scanned), and a search that finds fewer than k allowed hits is retried 4x wider up to it, then scanned.
_MAX_RETRY_EF = 4096
_REBUILD_MIN_DEAD = 64  # fewer tombstones than this never trigger a rebuild (a small graph rebuilds in no time)


def _faiss() -> Any:
    return require("faiss", "ann", "VectorIndex(kind='hnsw')")


def _new_graph(faiss: Any, dim: int, options: HnswOptions) -> Any:
    index = faiss.IndexHNSWFlat(dim, options.connectivity, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options.ef_construction
    index.hnsw.efSearch = options.ef_search
    return index


class HnswStore(Store):
    """Vectors in a FAISS HNSW graph (inner product on stored float32 rows), removals as tombstones."""

    kind = "hnsw"

    def __init__(self, dim: int, options: HnswOptions, *, index: Any = None, dead: np.ndarray | None = None,
                 mapped: bool = False) -> None:
        self.options = options
        self._dim = dim
        self._faiss = _faiss()
        self._index = _new_graph(self._faiss, dim, options) if index is None else index
        total = self._index.ntotal
        self._row_of_slot = np.arange(max(total, 16), dtype=np.int64)
        if dead is not None and dead.size:
            self._row_of_slot[dead] = -1
        self._slots = np.flatnonzero(self._row_of_slot[:total] >= 0)
        self._row_of_slot[self._slots] = np.arange(self._slots.size)
        self._n = self._slots.size
        # FAISS aborts the process when a memory-mapped index is changed, so such a store refuses changes.
        self.writable = not mapped

    def append(self, x: np.ndarray) -> None:
        total, m = self._index.ntotal, x.shape[0]
        self._index.add(x)
        self._row_of_slot = grown(self._row_of_slot, total, total + m)
        self._row_of_slot[total : total + m] = np.arange(self._n, self._n + m)
        self._slots = grown(self._slots, self._n, self._n + m)
        self._slots[self._n : self._n + m] = np.arange(total, total + m)
        self._n += m

    def keep(self, rows: np.ndarray) -> None:
        gone = np.ones(self._n, dtype=bool)
        gone[rows] = False
        self._row_of_slot[self._slots[: self._n][gone]] = -1
        self._slots = self._slots[rows].copy()
        self._row_of_slot[self._slots] = np.arange(rows.size)
        self._n = rows.size
        dead = self._index.ntotal - self._n
        if (dead >= _REBUILD_MIN_DEAD and dead > self._n) or self._n == 0:
            self._rebuild()

    def _rebuild(self) -> None:
        """A new graph of the live vectors, in row order: tombstones cost search time and memory until then."""
        index = _new_graph(self._faiss, self._dim, self.options)
        for start in range(0, self._n, 1 << 16):
            index.add(self.vectors(np.arange(start, min(self._n, start + (1 << 16)))))
        self._index = index
        self._slots = np.arange(max(self._n, 16), dtype=np.int64)
        self._row_of_slot = self._slots.copy()

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        slots = self._slots[np.asarray(rows, dtype=np.intp)]
        if slots.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        return self._index.reconstruct_batch(slots)

    def search(self, q: np.ndarray, k: int, rows: np.ndarray | None,
               ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        ef = ef_search or self.options.ef_search
        total = self._index.ntotal
        if rows is None:
            # Tombstones are never results; without any, FAISS needs no bitmap.
            allowed = None if total == self._n else self._row_of_slot[:total] >= 0
            return self._graph_search(q, k, ef, allowed, None)
        # The graph search widens ef_search by total / matches (below); past _MAX_RETRY_EF a scan is cheaper.
        if rows.size <= _EXACT_FILTER_ROWS or ef * total > _MAX_RETRY_EF * rows.size:
            return self._exact(q, k, rows)
        allowed = np.zeros(total, dtype=bool)
        allowed[self._slots[rows]] = True
        return self._graph_search(q, k, ef, allowed, rows)

    def _graph_search(self, q: np.ndarray, k: int, ef: int, allowed: np.ndarray | None,
                      rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Graph search over the allowed slots; a query that gets fewer than k is retried wider, then scanned."""
        faiss = self._faiss
        selector = None
        if allowed is not None:
            # FAISS keeps only a pointer: the local keeps the bitmap alive until the searches below are done.
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(allowed.size, faiss.swig_ptr(bitmap))
            # Only 1 in total / allowed candidates may be returned: keep that many more, so that about
            # ef_search of them are, as an unfiltered search keeps. Unwidened, filters matching 1-2% of 3000
            # clustered vectors got recall@10 0.91; widened, 2-10% of 50k get 0.999-1.0.
            ef = -(-ef * allowed.size // max(1, int(allowed.sum())))
        out_rows = np.empty((q.shape[0], k), dtype=np.intp)
        out_scores = np.empty((q.shape[0], k), dtype=np.float32)
        pending = np.arange(q.shape[0])
        ef = min(max(ef, k), max(k, _MAX_RETRY_EF))
        while pending.size:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if selector is not None:
                params.sel = selector
            scores, slots = self._index.search(q[pending], k, params=params)
            done = (slots >= 0).all(axis=1)
            out_rows[pending[done]] = self._row_of_slot[slots[done]]
            out_scores[pending[done]] = scores[done]
            pending = pending[~done]
            if ef >= _MAX_RETRY_EF:
                break
            ef = min(_MAX_RETRY_EF, ef * 4)
        if pending.size:
            # Fewer than k found (a selective filter, or a small graph): scan what may be returned.
            rows = np.arange(self._n) if rows is None else rows
            out_rows[pending], out_scores[pending] = self._exact(q[pending], k, rows)
        return out_rows, out_scores

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top, scores = exact_top_k(q, self.vectors(rows), k)
        return rows[top], scores

    def save(self, path: str | os.PathLike, header: dict) -> None:
        dead = np.flatnonzero(self._row_of_slot[: self._index.ntotal] < 0)
        header = dict(header, kind="hnsw", dead_slots=dead.tolist(),
                      hnsw={"connectivity": self.options.connectivity,
                            "ef_construction": self.options.ef_construction, "ef_search": self.options.ef_search})
        header_bytes = json.dumps(header).encode("utf-8")

        def write(f: BinaryIO) -> None:
            crc = 0

            def out(chunk: bytes) -> None:
                nonlocal crc
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)

            self._faiss.write_index(self._index, self._faiss.PyCallbackIOWriter(out))
            blob_len = f.tell()
            f.write(header_bytes)
            f.write(FOOTER.pack(blob_len, len(header_bytes), crc, zlib.crc32(header_bytes), FORMAT_VERSION, 0, MAGIC))

        atomic_write(path, write, what="index")


def read_hnsw(path: Path, where: str, mmap: bool) -> tuple[HnswStore, int, str, list, list, dict]:
    """Check an HNSW index file and open it: ``(store, dim, metric, ids, metadata, header)``.

    Raises:
        InputError: The file is not an edgemm index (for any reason; the message says which).
        MissingDependencyError: It is one, and FAISS is not installed.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < FOOTER.size:
            raise not_index(where, "it is neither an .npz archive nor an edgemm HNSW file (too short)")
        mapped = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
        try:
            dim, metric, ids, metadata, header, dead, options = _check_file(mapped, where)
        finally:
            with contextlib.suppress(BufferError):  # a traceback may still hold a view; the map closes with it
                mapped.close()
        faiss = _faiss()
        # FAISS reads by name. /proc/self/fd names the very file just checked, even if a save replaced it since.
        proc = f"/proc/self/fd/{f.fileno()}"
        source = proc if os.path.exists(proc) else str(path)
        try:
            index = faiss.read_index(source, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as e:
            raise not_index(where, f"FAISS could not read it ({str(e).strip().splitlines()[-1]})") from e
    if not isinstance(index, faiss.IndexHNSWFlat) or index.d != dim or index.ntotal != len(ids) + dead.size:
        raise not_index(where, "FAISS read a different index than the one checked (was it changed meanwhile?)")
    return HnswStore(dim, options, index=index, dead=dead, mapped=mmap), dim, metric, ids, metadata, header


def _check_file(mapped: mmap_module.mmap, where: str) -> tuple[int, str, list, list, dict, np.ndarray, HnswOptions]:
    bad = functools.partial(not_index, where)
    size = len(mapped)
    blob_len, header_len, blob_crc, header_crc, version, zero, magic = FOOTER.unpack_from(mapped, size - FOOTER.size)
    if magic != MAGIC:
        raise bad("it is neither an .npz archive nor an edgemm HNSW file (no edgemm footer)")
    if version > FORMAT_VERSION:
        raise InputError(f"{where} uses HNSW index format version {version}, but this edgemm reads up to version "
                         f"{FORMAT_VERSION}; upgrade edgemm (pip install -U edgemm) to load it.")
    if version < 1 or zero != 0:
        raise bad(f"its footer has format version {version} and a reserved field of {zero}")
    if blob_len + header_len + FOOTER.size != size:
        raise bad(f"its footer accounts for {blob_len} + {header_len} + {FOOTER.size} bytes, but it has {size} "
                  "(cut short, or something appended)")
    if header_len > LIMITS.max_json_bytes:
        raise InputError(f"{where}: its header is {header_len} bytes, more than edgemm.limits.max_json_bytes "
                         f"({LIMITS.max_json_bytes}); {LIMITS.hint('max_json_bytes')}.")
    if blob_len > LIMITS.max_index_bytes:
        raise InputError(f"{where} holds {blob_len} bytes of graph and vectors, more than "
                         f"edgemm.limits.max_index_bytes ({LIMITS.max_index_bytes}); {LIMITS.hint('max_index_bytes')}.")
    header_bytes = mapped[blob_len : blob_len + header_len]
    if zlib.crc32(header_bytes) != header_crc:
        raise bad("its header does not match its checksum (the file is damaged)")
    dim, metric, ids, metadata, header = parse_header(header_bytes, where, "hnsw")
    check_counts(header, len(ids), ids, metadata, where)
    options = _check_options(header, where)

    blob = memoryview(mapped)[:blob_len]
    try:
        crc = 0
        for start in range(0, blob_len, 64 << 20):
            crc = zlib.crc32(blob[start : start + (64 << 20)], crc)
        if crc != blob_crc:
            raise bad("its graph and vectors do not match their checksum (the file is damaged)")
        total = _check_blob(np.frombuffer(blob, dtype=np.uint8), dim, metric, options, where)
    finally:
        with contextlib.suppress(BufferError):
            blob.release()
    dead = _check_dead(header.get("dead_slots"), total, len(ids), where)
    return dim, metric, ids, metadata, header, dead, options


def _check_options(header: dict, where: str) -> HnswOptions:
    params = header.get("hnsw")
    if not isinstance(params, dict) or set(params) != {"connectivity", "ef_construction", "ef_search"}:
        raise not_index(where, "its header needs 'hnsw': {connectivity, ef_construction, ef_search}")
    try:
        return HnswOptions(**params)
    except InputError as e:
        raise not_index(where, f"its hnsw options are out of range ({e})") from e


def _check_dead(dead: Any, total: int, n: int, where: str) -> np.ndarray:
    if not isinstance(dead, list) or not set(map(type, dead)) <= {int}:
        raise not_index(where, "its header needs 'dead_slots', a list of ints")
    if len(dead) + n != total:
        raise not_index(where, f"its graph has {total} slots, but the header lists {n} vectors and {len(dead)} "
                        "removed ones")
    # json gives exact ints; bounded before they become an array.
    if dead and (min(dead) < 0 or max(dead) >= total):
        raise not_index(where, f"its removed slots must be from 0 to {total - 1}")
    array = np.array(dead, dtype=np.int64)
    if array.size > 1 and not (np.diff(array) > 0).all():
        raise not_index(where, "its removed slots must increase")
    return array


class _Reader:
    """Sequential, bounds-checked reads of FAISS's serialisation (scalars and length-prefixed vectors)."""

    def __init__(self, u8: np.ndarray, where: str) -> None:
        self.u8, self.at, self.where = u8, 0, where

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.at + n > len(self.u8):
            raise not_index(self.where, f"its FAISS blob is cut short (in {what})")
        part = self.u8[self.at : self.at + n]
        self.at += n
        return part

    def scalars(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what).tobytes())

    def vector(self, dtype: str, what: str) -> np.ndarray:
        (count,) = self.scalars("<Q", what)
        item = np.dtype(dtype).itemsize
        if count > (len(self.u8) - self.at) // item:
            raise not_index(self.where, f"its FAISS {what} declares {count} entries, more than the file holds")
        return self.take(count * item, what).view(dtype)

    def index_header(self, fourcc: bytes, dim: int, what: str) -> int:
        if self.take(4, what).tobytes() != fourcc:
            raise not_index(self.where, f"its FAISS blob does not hold an {what} ({fourcc.decode()}) where expected")
        d, total, _, _, trained, metric = self.scalars("<iqqqBi", what)
        if d != dim or total < 0 or trained != 1 or metric != 0:  # metric 0: inner product
            raise not_index(self.where, f"its FAISS {what} has dimension {d}, {total} vectors, trained={trained} "
                            f"and metric {metric}; expected dimension {dim}, inner product")
        return total


@functools.cache
def _expected_levels(connectivity: int) -> tuple[bytes, bytes]:
    """A new graph's level tables (assign_probas, cum_nneighbor_per_level) for this connectivity, as FAISS makes them."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(1, connectivity, faiss.METRIC_INNER_PRODUCT)
    hnsw = index.hnsw  # a view into index, which must outlive it
    return (faiss.vector_to_array(hnsw.assign_probas).astype("<f8").tobytes(),
            faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype("<i4").tobytes())


def _check_blob(u8: np.ndarray, dim: int, metric: str, options: HnswOptions, where: str) -> int:
    """Check everything FAISS reads and its search dereferences; return the number of slots."""
    bad = functools.partial(not_index, where)
    r = _Reader(u8, where)
    total = r.index_header(b"IHNf", dim, "HNSW index")
    probas, cum = r.vector("<f8", "level probabilities"), r.vector("<i4", "neighbours per level")
    if (probas.tobytes(), cum.tobytes()) != _expected_levels(options.connectivity):
        raise bad(f"its FAISS level tables are not those of a graph of connectivity {options.connectivity}")
    levels = r.vector("<i4", "node levels").astype(np.int64)
    offsets = r.vector("<u8", "neighbour offsets")
    neighbours = r.vector("<i4", "neighbour lists")
    entry, top, ef_construction, ef_search, _ = r.scalars("<5i", "graph fields")
    if levels.size != total or offsets.size != total + 1:
        raise bad(f"its FAISS graph has {levels.size} levels and {offsets.size} offsets for {total} nodes")
    if (ef_construction, ef_search) != (options.ef_construction, options.ef_search):
        raise bad("its FAISS graph's ef_construction / ef_search disagree with its header")
    cum = cum.astype(np.int64)
    if total:
        # FAISS stores a node's level + 1: its lists cover levels 0 .. levels[i] - 1.
        if levels.min() < 1 or levels.max() >= cum.size:
            raise bad("its FAISS node levels are out of range")
        if not 0 <= entry < total or top != levels.max() - 1 or levels[entry] != top + 1:
            raise bad(f"its FAISS entry node {entry} or top level {top} is out of range")
        if offsets[0] != 0 or not np.array_equal(np.diff(offsets.astype(np.int64)), cum[levels]) \
                or int(offsets[-1]) != neighbours.size:
            raise bad("its FAISS neighbour offsets do not match the node levels")
        if neighbours.size and (neighbours.min() < -1 or neighbours.max() >= total):
            raise bad(f"a FAISS neighbour link points outside the graph's {total} nodes")
        starts = offsets[:-1].astype(np.int64)
        for level in range(1, int(top) + 1):
            # A link on an upper level must lead to a node on that level: the search reads that node's list there.
            on = np.flatnonzero(levels > level)
            width = int(cum[level + 1] - cum[level])
            for chunk in range(0, on.size, 1 << 15):
                nodes = on[chunk : chunk + (1 << 15)]
                links = neighbours[(starts[nodes] + cum[level])[:, None] + np.arange(width)]
                links = links[links >= 0]
                if links.size and (levels[links] <= level).any():
                    raise bad(f"a FAISS level-{level} link points to a node below that level")
    elif entry != -1 or top != -1 or neighbours.size or offsets[0] != 0:
        raise bad("its empty FAISS graph has an entry node, levels or links")
    if r.index_header(b"IxFI", dim, "flat storage") != total:
        raise bad("its FAISS storage and graph hold different numbers of vectors")
    vectors = r.vector("<f4", "stored vectors")  # FAISS counts flat storage in 4-byte words: one per float
    if vectors.size != total * dim:
        raise bad(f"its FAISS storage holds {vectors.size} floats for {total} vectors of dimension {dim}")
    if r.at != len(u8):
        raise bad(f"its FAISS blob has {len(u8) - r.at} bytes after the index")
    _check_vectors(vectors.reshape(total, dim), metric, where)
    return total


def _check_vectors(vectors: np.ndarray, metric: str, where: str) -> None:
    for start in range(0, vectors.shape[0], _CHECK_ROWS):
        block = vectors[start : start + _CHECK_ROWS]
        if metric == "cosine":
            # Unit rows cannot overflow a float32 sum of squares; NaN and inf make it non-finite.
            norms = np.einsum("ij,ij->i", block, block)
            broken = ~(np.abs(norms - 1) <= _NORM_TOLERANCE)
        else:
            broken = ~np.isfinite(block).all(axis=1)
        if broken.any():
            what = "not a unit vector, which a cosine index stores" if metric == "cosine" else "not finite"
            raise not_index(where, f"vector slot {start + int(np.flatnonzero(broken)[0])} is {what}")
