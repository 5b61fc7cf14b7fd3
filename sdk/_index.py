"""In-process vector indexes: exact (numpy only) or approximate (an HNSW graph).

``VectorIndex(dim)`` keeps every vector in one float32 matrix and answers a search
with one BLAS matrix product plus a vectorised top-k, so its results are exact
(the same as a brute-force scan) and need no optional package. It saves to a
single ``.npz`` file atomically.

``VectorIndex(dim, kind="hnsw")`` keeps the vectors in an HNSW graph instead
(``edgemm._ann``, FAISS; ``pip install 'edgemm[ann]'``): a search visits a few
thousand vectors rather than all of them, at a measured recall below 1. Both
kinds share this module's bookkeeping (ids, metadata, checks, locking, files
saved atomically), so they behave the same apart from exactness; ``load`` tells
their files apart.

Example:
    >>> index = VectorIndex(384)                      # cosine by default
    >>> index.add(embeddings, metadata=[{"path": p} for p in paths])
    >>> hits = index.search(query_embedding, k=5)[0]  # one list per query
    >>> hits[0].id, hits[0].score, hits[0].metadata
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from edgemm._files import atomic_write
from edgemm.runtime.errors import InputError
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import parse_json

__all__ = ["Hit", "HnswOptions", "VectorIndex"]

IndexId = int | str
Filter = Callable[[dict | None], bool]
Reranker = Callable[[int, np.ndarray, Sequence["Hit"]], np.ndarray]

FORMAT_NAME = "edgemm-index"
FORMAT_VERSION = 1
METRICS = ("cosine", "ip")
KINDS = ("exact", "hnsw")

# The score matrix of one query chunk is (chunk, len(index)) float32; this caps
# it. Measured on 100k x 384: chunks of ~500 queries run within ~5% of one
# unchunked 1000-query product, while 64-query chunks cost ~60% more.
_SCORE_BUDGET_BYTES = 256 * 2**20
_MAX_CHUNK = 4096
_MIN_CAPACITY = 16

# Deflate's best case is one 258-byte match per 2-bit code, about 1032:1; a member claiming more lies.
_MAX_DEFLATE_RATIO = 1040
# Nesting of one metadata entry. Deeper data would make get() (deepcopy) and save() (json) recurse
# towards Python's limit, so add() refuses it and load() refuses files that hold it.
_MAX_METADATA_DEPTH = 64
_READ_CHUNK_BYTES = 16 << 20  # load() inflates and checks vectors this much at a time
_NORM_TOLERANCE = 1e-4  # under cosine, load() renormalises rows whose norm is further than this from 1
_JSON_CONTAINERS = {list, dict}


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result.

    Attributes:
        id: The id the vector was added with (int or str, as given).
        score: Cosine similarity or inner product; higher is better.
        metadata: The dict stored with the vector, or None. It is the index's
            own copy: treat it as read-only.
    """

    id: IndexId
    score: float
    metadata: dict | None


@dataclass(frozen=True, slots=True)
class HnswOptions:
    """How ``VectorIndex(kind="hnsw")`` builds and searches its graph.

    The defaults are the measured choice for 384-d embeddings (benchmarks/ann_choice.py,
    benchmarks/results/index-ann-choice.md): recall@10 0.998 at 200k and 0.984 at 1M
    vectors of clustered data; connectivity 32 bought no recall per query/s. Raise ``ef_search`` (per index, or per call with
    ``search(..., ef_search=)``) for more recall at fewer queries per second.
    """

    connectivity: int = 16  # M: links per node on the upper layers (2M on the base one); more: recall, memory
    ef_construction: int = 128  # candidates kept while inserting a vector; more: a better graph, slower add()
    ef_search: int = 64  # candidates kept while searching (at least k); more: recall, slower search()

    def __post_init__(self) -> None:
        for name, low, high in (("connectivity", 2, _MAX_CONNECTIVITY), ("ef_construction", 1, _MAX_EF),
                                ("ef_search", 1, _MAX_EF)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise InputError(f"HnswOptions.{name} must be an int from {low} to {high}, got {value!r}.")
            object.__setattr__(self, name, int(value))


_MAX_CONNECTIVITY = 256  # FAISS takes more, but past 64 memory grows with no recall left to gain
_MAX_EF = 65_536


class Store:
    """Where a ``VectorIndex`` keeps its vectors: rows 0..n-1, in the order of the index's ids.

    The index does the bookkeeping (ids, metadata, argument checks, locking) and
    hands a store checked float32 rows, already normalised under the cosine
    metric; a store holds, searches and saves them. One subclass per kind.
    """

    kind: ClassVar[str]
    writable: bool = True  # False for an index served from a memory-mapped file

    def append(self, x: np.ndarray) -> None:
        """Store ``x`` (m, dim) as the next m rows."""
        raise NotImplementedError

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (sorted), which become rows 0..len(rows)-1."""
        raise NotImplementedError

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """A float32 (len(rows), dim) copy of the given rows."""
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int, rows: np.ndarray | None,
               ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` rows per query (``k`` at most the rows searched): ``(rows, scores)``, both (Q, k), best first.

        ``rows``, when given, are the only rows to search (a filter's matches);
        there is at least one row to search.
        """
        raise NotImplementedError

    def save(self, path: str | os.PathLike, header: dict) -> None:
        """Write ``header`` (the bookkeeping's fields) and the vectors to ``path`` atomically."""
        raise NotImplementedError


class _ExactStore(Store):
    """One growable float32 matrix, searched with a full matrix product."""

    kind = "exact"

    def __init__(self, dim: int, capacity: int = _MIN_CAPACITY) -> None:
        self._data = np.zeros((max(capacity, _MIN_CAPACITY), dim), dtype=np.float32)
        self._n = 0

    def append(self, x: np.ndarray) -> None:
        self._data = grown(self._data, self._n, self._n + x.shape[0])
        self._data[self._n : self._n + x.shape[0]] = x
        self._n += x.shape[0]

    def keep(self, rows: np.ndarray) -> None:
        self._data[: rows.size] = self._data[rows]
        self._n = rows.size
        # Give memory back after large deletions; halving keeps shrinks amortised.
        if self._data.shape[0] > _MIN_CAPACITY and self._n < self._data.shape[0] // 4:
            self._data = self._data[: max(_MIN_CAPACITY, self._data.shape[0] // 2)].copy()

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._data[np.asarray(rows, dtype=np.intp)]

    def search(self, q: np.ndarray, k: int, rows: np.ndarray | None,
               ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        # Without a filter, base is a view: BLAS reads the stored matrix in place, no copy.
        base = self._data[: self._n] if rows is None else self._data[rows]
        top, scores = exact_top_k(q, base, k)
        return (top if rows is None else rows[top]), scores

    def save(self, path: str | os.PathLike, header: dict) -> None:
        header_bytes = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        atomic_write(path, lambda f: np.savez(f, header=header_bytes, vectors=self._data[: self._n]), what="index")


def _hnsw_store(dim: int, options: HnswOptions | None) -> Store:
    from edgemm._ann import HnswStore  # imports FAISS, or names the extra to install

    return HnswStore(dim, options or HnswOptions())


# kind -> a new, empty store of that kind.
_NEW_STORE: dict[str, Callable[[int, HnswOptions | None], Store]] = {
    "exact": lambda dim, options: _ExactStore(dim),
    "hnsw": _hnsw_store,
}


class BaseIndex:
    """What every edgemm index shares: ``dim``, ``metric`` and ``search`` (its checks, filtering and reranking).

    A subclass sets ``_dim`` and ``_metric`` and implements ``_search(queries, k,
    filter, keep_vectors, ef_search)``, returning per query its hits and, when
    ``keep_vectors``, their vectors.
    """

    _dim: int
    _metric: str

    @property
    def dim(self) -> int:
        """Length of every vector."""
        return self._dim

    @property
    def metric(self) -> str:
        """``"cosine"`` or ``"ip"``."""
        return self._metric

    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        filter: Filter | None = None,
        rerank: int | None = None,
        reranker: Reranker | None = None,
        ef_search: int | None = None,
    ) -> list[list[Hit]]:
        """Find the ``k`` best-scoring stored vectors for each query.

        Args:
            queries: Array-like of shape ``(Q, dim)``, or ``(dim,)`` for one query.
            k: How many hits per query; more than the index holds returns all.
            filter: Optional ``filter(metadata) -> bool``; only vectors for which
                it returns true are searched. ``VectorIndex`` calls it once per
                stored vector per call, in Python, so it is slow on large indexes.
                Filtered searches still return ``k`` hits when ``k`` vectors match.
                ``QdrantIndex`` also takes a dict of metadata equality conditions,
                which Qdrant itself applies.
            rerank: Rescore the vector search's top ``rerank`` (≥ k) with
                ``reranker`` and return its best ``k``; hit scores are then the
                reranker's (e.g. a match probability).
            reranker: ``reranker(query_number, candidate_vectors, hits) -> scores``,
                e.g. ``model.reranker(texts)`` of a fusion model. It runs after
                the index lock is released, so writers are not held up.
            ef_search: For approximate indexes, candidates kept during this search
                (more: higher recall, slower); default: the index's own.

        Returns:
            One list per query (also for a single 1-D query) of up to ``k`` hits,
            best first. An empty index (or a filter that keeps nothing) gives
            empty lists.

        Raises:
            InputError: If the queries are of the wrong shape or dimension, not
                finite, zero-norm under the cosine metric, ``k`` is not a
                positive int, ``rerank`` comes without a reranker (or below k),
                or ``ef_search`` is not a positive int or is given to an exact index.
        """
        k = _positive_int(k, "k")
        if ef_search is not None:
            ef_search = _positive_int(ef_search, "ef_search")
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < k:
                raise InputError(f"rerank must be an int ≥ k ({k}): how many vector hits to rescore; got {rerank!r}.")
            if not callable(reranker):
                raise InputError("rerank needs reranker=, e.g. model.reranker(texts) of a fusion model.")
            hits = self._search(queries, int(rerank), filter, True, ef_search)
            return [_rerank(q, found, vectors, reranker, k) for q, (found, vectors) in enumerate(hits)]
        return [found for found, _ in self._search(queries, k, filter, False, ef_search)]

    def _search(self, queries: Any, k: int, filter: Any, keep_vectors: bool,
                ef_search: int | None) -> list[tuple[list[Hit], np.ndarray | None]]:
        raise NotImplementedError


class VectorIndex(BaseIndex):
    """Nearest-neighbour index over float32 vectors: exact, or approximate with ``kind="hnsw"``.

    ``kind="exact"`` (the default) keeps the vectors in one growable float32 matrix;
    search is a matrix product over all of it followed by a two-stage top-k (see
    ``_top_k``), so results are exact. ``kind="hnsw"`` keeps them in an HNSW graph
    (FAISS, ``pip install 'edgemm[ann]'``): search visits a small part of the
    collection, so it stays fast at millions of vectors, and its hits are the exact
    ones at a recall below 1 (measured: see ``HnswOptions``). Everything else is the
    same for both kinds. All public methods take an internal ``threading.RLock``, so
    one index can be shared between threads (searches are then serialised; BLAS and
    FAISS still use several cores).

    Behaviour worth knowing:
        * Searching an empty index returns one empty list per query, not an
          error, so a freshly created index can serve requests.
        * Ids keep their type: ``1`` and ``"1"`` are different ids, and both
          survive ``save``/``load`` unchanged. Without explicit ids, new ids
          are consecutive ints after the largest int id ever used (removed ids
          are not reused, also across ``save``/``load``).
        * Metadata is stored as its JSON round trip (tuples become lists,
          non-string keys become strings), so what ``search`` and ``get``
          return is exactly what a saved and reloaded index returns.
        * With ``metric="cosine"`` stored vectors are L2-normalised on ``add``,
          so ``get`` returns the normalised vector.
        * Scores are float32 products: the same query may score a last-bit
          differently in another batch size (BLAS picks other kernels), as with
          FAISS.

    Args:
        dim: Length of every vector; a positive int.
        metric: ``"cosine"`` (vectors and queries L2-normalised) or ``"ip"``
            (raw inner product).
        kind: ``"exact"`` or ``"hnsw"``.
        hnsw: Graph parameters for ``kind="hnsw"`` (default ``HnswOptions()``).

    Raises:
        InputError: If ``dim`` is not a positive int or is more than
            ``edgemm.limits.max_dim``, ``metric`` or ``kind`` is unknown, or
            ``hnsw`` is given for an exact index.
        MissingDependencyError: ``kind="hnsw"`` without FAISS installed.
    """

    def __init__(self, dim: int, metric: str = "cosine", kind: str = "exact", *,
                 hnsw: HnswOptions | None = None) -> None:
        dim, metric = check_dim(dim), check_metric(metric)
        if kind not in KINDS:
            raise InputError(f"Unknown kind {kind!r}; use 'exact' (every vector compared; the default) or 'hnsw' "
                             "(an approximate graph for large collections).")
        if hnsw is not None and kind != "hnsw":
            raise InputError(f"hnsw= options apply to kind='hnsw', not kind={kind!r}; pass kind='hnsw' too.")
        if hnsw is not None and not isinstance(hnsw, HnswOptions):
            raise InputError(f"hnsw must be an edgemm.HnswOptions, got {type(hnsw).__name__}.")
        self._attach(dim, metric, _NEW_STORE[kind](dim, hnsw), [], [], 0)

    def _attach(self, dim: int, metric: str, store: Store, ids: list[IndexId], metadata: list[dict | None],
                next_id: int) -> None:
        """Set every field: ``__init__`` for a new index, ``load`` for a read one."""
        self._dim = dim
        self._metric = metric
        self._lock = threading.RLock()
        self._store = store
        self._ids = ids
        self._metadata = metadata
        self._row_of: dict[IndexId, int] = {id_: r for r, id_ in enumerate(ids)}
        # Next auto-assigned id: one past the largest int id ever added.
        self._next_id = next_id

    # ------------------------------------------------------------------ basics

    @property
    def kind(self) -> str:
        """``"exact"`` or ``"hnsw"``."""
        return self._store.kind

    @property
    def hnsw(self) -> HnswOptions | None:
        """The graph's parameters for ``kind="hnsw"``, else None."""
        return getattr(self._store, "options", None)

    @property
    def read_only(self) -> bool:
        """True for an index served from a memory-mapped file (``load(path, mmap=True)``)."""
        return not self._store.writable

    @property
    def ids(self) -> list[IndexId]:
        """The stored ids in storage order (a copy)."""
        with self._lock:
            return list(self._ids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def __contains__(self, id: object) -> bool:
        with self._lock:
            return lookup_key(id) in self._row_of

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self._dim}, metric={self._metric!r}, kind={self.kind!r}, size={len(self)})"

    def get(self, id: IndexId) -> tuple[np.ndarray, dict | None]:
        """Return one stored vector and its metadata.

        Args:
            id: An id present in the index.

        Returns:
            ``(vector, metadata)``: a float32 copy of the stored vector (normalised
            for the cosine metric) and a copy of its metadata dict, or None.

        Raises:
            InputError: If the id is not in the index.
        """
        with self._lock:
            row = self._row(id)
            return self._store.vectors([row])[0], copy.deepcopy(self._metadata[row])

    # ------------------------------------------------------------------ mutate

    def add(
        self,
        vectors: Any,
        ids: Sequence[IndexId] | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[IndexId]:
        """Add vectors, with optional ids and metadata.

        Args:
            vectors: Array-like of shape ``(N, dim)``, or ``(dim,)`` for one vector.
            ids: One unique int or str per vector, none already in the index.
                Default: consecutive ints after the largest int id used so far.
            metadata: One JSON-serialisable dict (or None) per vector.

        Returns:
            The ids of the added vectors, in order.

        Raises:
            InputError: If the vectors are empty, of the wrong shape or dimension,
                not finite, zero-norm under the cosine metric; or if ids or
                metadata do not match the vectors, repeat, or already exist; or
                if metadata nests deeper than 64 levels; or if the index is
                read-only (memory-mapped).
        """
        with self._lock:
            self._check_writable("add to")
            x, new_ids, new_meta = check_new_entries(vectors, ids, metadata, self._dim, self._metric, self._next_id)
            present = [i for i in new_ids if i in self._row_of]
            if present:
                raise already_present(present)

            # Nothing is mutated before this point, so a bad call leaves the index as it was.
            self._store.append(x)
            n = len(self._ids)
            for offset, id_ in enumerate(new_ids):
                self._row_of[id_] = n + offset
            self._ids.extend(new_ids)
            self._metadata.extend(new_meta)
            self._next_id = next_int_id(self._next_id, new_ids)
            return new_ids

    def remove(self, ids: Iterable[IndexId] | IndexId) -> int:
        """Remove vectors by id and compact the storage.

        Args:
            ids: The ids to remove (a single int or str is accepted too).

        Returns:
            How many vectors were removed.

        Raises:
            InputError: If an id is not in the index or is given twice, or the
                index is read-only (memory-mapped); nothing is removed then.
        """
        with self._lock:
            ids = id_list(ids)
            self._check_writable("remove from")
            rows = [self._row(i) for i in ids]
            if len(set(rows)) != len(rows):
                raise InputError("ids passed to remove() contain duplicates; pass each id once.")
            if not rows:
                return 0

            keep = np.ones(len(self._ids), dtype=bool)
            keep[rows] = False
            kept_rows = np.flatnonzero(keep)
            self._store.keep(kept_rows)
            self._ids = [self._ids[r] for r in kept_rows.tolist()]
            self._metadata = [self._metadata[r] for r in kept_rows.tolist()]
            self._row_of = {id_: r for r, id_ in enumerate(self._ids)}
            return len(rows)

    # ------------------------------------------------------------------ search

    def _search(self, queries: Any, k: int, filter: Filter | None, keep_vectors: bool,
                ef_search: int | None) -> list[tuple[list[Hit], np.ndarray | None]]:
        if filter is not None and not callable(filter):
            raise InputError(f"filter must be a callable metadata -> bool, got {type(filter).__name__}.")
        if ef_search is not None and self.kind == "exact":
            raise InputError("ef_search applies to approximate indexes (kind='hnsw'); an exact index compares "
                             "every vector. Leave it out.")
        with self._lock:
            q = check_queries(queries, self._dim, self._metric)
            if q.shape[0] == 0:
                return []
            if filter is None:
                rows = None
                n = len(self._ids)
            else:
                rows = np.fromiter((r for r, m in enumerate(self._metadata) if filter(m)), dtype=np.intp)
                n = rows.size
            if n == 0:
                return [([], None) for _ in range(q.shape[0])]

            top_rows, top_scores = self._store.search(q, min(k, n), rows, ef_search)
            ids, metadata = self._ids, self._metadata
            results: list[tuple[list[Hit], np.ndarray | None]] = []
            for r_list, s_list in zip(top_rows.tolist(), top_scores.tolist()):
                vectors = self._store.vectors(r_list) if keep_vectors else None
                results.append(([Hit(ids[r], s, metadata[r]) for r, s in zip(r_list, s_list)], vectors))
            return results

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one file, atomically: ``.npz`` for the exact kind, a checked HNSW file for ``"hnsw"``.

        The file is written to a temporary file in the same directory, flushed
        and fsynced, then renamed over ``path``; a crash or kill mid-save leaves
        any previous file at ``path`` intact. A temp file that a killed save left
        behind is removed by the next save of the same path; Ctrl-C or SIGTERM
        during a save removes it at once. A symlink at ``path`` stays a link:
        its target is replaced (see ``edgemm._files.atomic_write``).

        Args:
            path: Destination file; its directory must exist. Written as given
                (no suffix is added).

        Raises:
            InputError: If the directory does not exist; ``path`` is a directory,
                FIFO, device or other non-regular file; or the filesystem refuses
                the write (permissions, full disk). The message names ``path`` and
                the system's reason; the old file is kept.
        """
        with self._lock:
            header = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "dim": self._dim,
                "metric": self._metric,
                "count": len(self._ids),
                "next_id": self._next_id,
                "ids": self._ids,
                "metadata": self._metadata,
            }
            self._store.save(path, header)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> VectorIndex:
        """Read an index written by ``save``, of either kind (told apart by the file's layout).

        The file is treated as untrusted: its sizes are checked against each other
        and against ``edgemm.limits`` (``max_index_bytes``, ``max_json_bytes``,
        ``max_dim``) before anything large is inflated or allocated. An exact file's
        vectors are read in bounded chunks; an HNSW file's checksums, header and
        every array and link of its graph are checked before FAISS reads it.

        Args:
            path: A file written by ``VectorIndex.save``.
            mmap: Serve an HNSW file from a read-only memory map instead of reading
                it into memory: opening costs one checking pass over the file and
                the vectors stay in the page cache, shared between processes.
                ``add`` and ``remove`` then raise; ``save`` still works.

        Returns:
            The loaded index. Under the cosine metric, rows a foreign writer left
            unnormalised in an exact file are normalised.

        Raises:
            InputError: If the file does not exist or cannot be read; is not an
                edgemm index file (for an exact file: not a zip of exactly
                ``header.npy`` and ``vectors.npy``, sizes that disagree, a header
                that is not JSON or nests metadata deeper than 64 levels, ids that
                repeat, vectors that are not finite or, under the cosine metric,
                zero; for an HNSW file: a checksum, size, header field or graph
                link that is wrong); declares more than a limit allows (the message
                names the limit to raise); was written by a newer edgemm; does not
                fit in memory; or ``mmap`` is asked of an exact file.
            MissingDependencyError: An HNSW file without FAISS installed.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"No index file at {str(path)!r}; check the path (save() writes a single file).")

        where = repr(str(path))
        try:
            with open(path, "rb") as f:
                start = f.read(6)
        except OSError as e:
            raise InputError(f"Cannot read the index {where}: {e.strerror or e}.") from e
        if start == b"\x93NUMPY":
            raise not_index(where, "it holds a single .npy array, not an .npz archive")
        try:
            if start[:2] != b"PK":  # not a zip: an HNSW file, or nothing edgemm wrote
                from edgemm._ann import read_hnsw

                return cls._assembled(*read_hnsw(path, where, mmap))
            if mmap:
                raise InputError(f"{where} is an exact index, which is always read into memory; mmap=True serves "
                                 "indexes saved with kind='hnsw'. Load it without mmap.")
            try:
                with zipfile.ZipFile(path) as zf:
                    return cls._assembled(*_read_exact(zf, path.stat().st_size, where))
            except InputError:
                raise
            except (OSError, ValueError, EOFError, KeyError, RuntimeError, RecursionError, struct.error, zlib.error,
                    zipfile.BadZipFile) as e:
                # Truncated or foreign files fail in many ways inside zipfile and numpy's reader.
                raise not_index(where, f"cannot read it as .npz ({type(e).__name__}: {e})") from e
        except MemoryError as e:
            raise InputError(
                f"Not enough memory to load the index {where} ({e or 'MemoryError'}); "
                "free memory or load it on a larger machine."
            ) from e

    @classmethod
    def _assembled(cls, store: Store, dim: int, metric: str, ids: list, metadata: list,
                   header: dict) -> VectorIndex:
        index = cls.__new__(cls)
        next_id = header.get("next_id", 0)
        if isinstance(next_id, bool) or not isinstance(next_id, int):
            next_id = 0
        # Never hand out an id that is present, even if next_id was edited by hand.
        index._attach(dim, metric, store, ids, metadata, next_int_id(next_id, ids))
        return index

    # ------------------------------------------------------------------ helpers

    def _check_writable(self, doing: str) -> None:
        if not self._store.writable:
            raise InputError(f"Cannot {doing} this index: it is served read-only from a memory-mapped file "
                             "(load(path, mmap=True)). Load it without mmap to change it.")

    def _row(self, id: object) -> int:
        """Storage row of ``id``; ints and strs never match each other."""
        row = self._row_of.get(lookup_key(id))
        if row is None:
            raise unknown_id(id)
        return row


# ---------------------------------------------------------------------- checks shared by every index kind


def check_dim(dim: object) -> int:
    """``dim`` as an int, checked against ``edgemm.limits.max_dim``."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise InputError(f"dim must be a positive int, got {dim!r}.")
    if dim > LIMITS.max_dim:
        raise InputError(
            f"dim {dim} is more than edgemm.limits.max_dim ({LIMITS.max_dim}); {LIMITS.hint('max_dim')}."
        )
    return int(dim)


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise InputError(f"Unknown metric {metric!r}; use one of {', '.join(map(repr, METRICS))}.")
    return str(metric)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def check_new_entries(vectors: Any, ids: Sequence[IndexId] | None, metadata: Sequence[dict | None] | None, dim: int,
                      metric: str, next_id: int) -> tuple[np.ndarray, list[IndexId], list[dict | None]]:
    """What ``add`` stores: checked (and under cosine normalised) rows, ids and metadata's JSON round trip.

    Whether the ids are already present is the caller's check (``already_present``).
    """
    x = as_matrix(vectors, "vectors", dim)
    if x.shape[0] == 0:
        raise InputError(f"vectors is empty (shape {x.shape}); pass at least one vector of length {dim}.")
    n_new = x.shape[0]
    new_ids = _check_new_ids(ids, n_new, next_id)
    new_meta = _check_metadata(metadata, n_new)
    if metric == "cosine":
        x = _normalise(x, "vectors")
    return x, new_ids, new_meta


def check_queries(queries: Any, dim: int, metric: str) -> np.ndarray:
    """Checked float32 (Q, dim) queries, normalised under cosine; Q may be 0."""
    q = as_matrix(queries, "queries", dim)
    if metric == "cosine" and q.shape[0]:
        q = _normalise(q, "queries")
    return q


def next_int_id(next_id: int, ids: Iterable[IndexId]) -> int:
    """One past the largest int id among ``ids``, or ``next_id`` if that is larger."""
    return max([next_id] + [i + 1 for i in ids if isinstance(i, int)])


def id_list(ids: Iterable[IndexId] | IndexId) -> list:
    """``remove``'s argument as a list (a single int or str is one id)."""
    if isinstance(ids, (int, np.integer, str)) and not isinstance(ids, bool):
        return [ids]
    try:
        return list(ids)
    except TypeError:
        raise InputError(f"ids must be an id or an iterable of ids, got {type(ids).__name__}.") from None


def lookup_key(id: object) -> Any:
    """``id`` as stored: numpy ints become ints; anything that is not an int or str matches nothing."""
    if isinstance(id, np.integer):
        id = int(id)
    # Only real ints and strs can match: True and 1.0 hash like 1 but are not ids.
    return id if _valid_id(id) else _NO_ID


_NO_ID = object()


def unknown_id(id: object) -> InputError:
    return InputError(f"Unknown id {id!r}: it is not in the index (ids are matched by value and type).")


def already_present(present: list) -> InputError:
    return InputError(f"ids {present[:10]!r} are already in the index; remove() them first or use new ids.")


def as_matrix(arr: Any, name: str, dim: int) -> np.ndarray:
    """Check shape, dtype and finiteness; return a C-contiguous float32 (N, dim) array."""
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError) as e:
        raise InputError(f"{name} must be a numeric array of shape (N, {dim}): {e}") from e
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{name} must hold real numbers, got dtype {a.dtype}.")
    if a.ndim not in (1, 2):
        raise InputError(f"{name} must be 2-D (N, {dim}) or 1-D ({dim},), got {a.ndim}-D shape {a.shape}.")
    if a.shape[0] == 0:
        # No rows at all ([] or shape (0, d)): the caller decides whether that is an error.
        return np.empty((0, dim), dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.shape[1] != dim:
        raise InputError(f"{name} have dimension {a.shape[1]}, expected {dim} (the index's dim); got shape {a.shape}.")
    with np.errstate(over="ignore"):
        a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad_rows = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise InputError(
            f"{name} contain NaN or infinite values (or values too large for float32) "
            f"in row(s) {bad_rows[:10].tolist()}; clean or drop those rows."
        )
    return a


def _check_new_ids(ids: Sequence[IndexId] | None, n_new: int, next_id: int) -> list[IndexId]:
    if ids is None:
        return list(range(next_id, next_id + n_new))
    if isinstance(ids, (str, bytes, int, np.integer)):
        raise InputError(
            f"ids must be a sequence with one id per vector, got a single {type(ids).__name__}; "
            "wrap it in a list, e.g. ids=[...]."
        )
    try:
        ids = list(ids)
    except TypeError:
        raise InputError(f"ids must be a sequence of ints or strs, got {type(ids).__name__}.") from None
    if len(ids) != n_new:
        raise InputError(f"Got {len(ids)} ids for {n_new} vectors; pass exactly one id per vector.")
    out: list[IndexId] = []
    for i in ids:
        # numpy scalars become plain int/str so ids save, compare and print as given.
        if isinstance(i, np.integer):
            i = int(i)
        elif isinstance(i, str):
            i = str(i)
        if not _valid_id(i):
            raise InputError(f"id {i!r} has type {type(i).__name__}; ids must be int or str.")
        out.append(i)
    # Only ints and strs get here, and 1 != "1", so a plain set tells them apart.
    if len(set(out)) != len(out):
        seen: set = set()
        dups = [i for i in out if i in seen or seen.add(i)]
        raise InputError(f"ids contain duplicates {dups[:10]!r}; every id must be unique.")
    return out


def exact_top_k(q: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact best ``k`` rows of ``base`` for each query: ``(rows, scores)``, both (Q, k), best first."""
    n = base.shape[0]
    # Even chunks under the memory budget: 1000 queries become 2 x 500, not 671 + 329.
    max_chunk = max(1, min(_MAX_CHUNK, _SCORE_BUDGET_BYTES // (4 * n)))
    n_chunks = -(-q.shape[0] // max_chunk)
    chunk = -(-q.shape[0] // n_chunks)
    rows = np.empty((q.shape[0], k), dtype=np.intp)
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    for start in range(0, q.shape[0], chunk):
        qc = q[start : start + chunk]
        products = np.empty((qc.shape[0], n), dtype=np.float32)
        np.matmul(qc, base.T, out=products)
        rows[start : start + chunk], scores[start : start + chunk] = _top_k(products, k)
    return rows, scores


def grown(arr: np.ndarray, used: int, needed: int) -> np.ndarray:
    """``arr`` with room for ``needed`` rows, its first ``used`` kept; doubling keeps repeated adds amortised O(1)."""
    if needed <= arr.shape[0]:
        return arr
    grown = np.zeros((max(needed, 2 * arr.shape[0]), *arr.shape[1:]), dtype=arr.dtype)
    grown[:used] = arr[:used]
    return grown


# ---------------------------------------------------------------------- the exact kind's file


def _read_exact(zf: zipfile.ZipFile, file_bytes: int,
                where: str) -> tuple[Store, int, str, list, list, dict]:
    """Check every declared size against the others and the limits, then read in bounded chunks."""
    bad = functools.partial(not_index, where)
    infos = {info.filename: info for info in zf.infolist()}
    names = sorted(info.filename for info in zf.infolist())  # a list: a zip may repeat a name
    if names != ["header.npy", "vectors.npy"]:
        raise bad(f"expected arrays 'header' and 'vectors' (members header.npy, vectors.npy), found {names}")
    declared = sum(info.file_size for info in infos.values())
    if declared > LIMITS.max_index_bytes:
        raise InputError(
            f"{where} declares {declared} bytes of index data once inflated, more than "
            f"edgemm.limits.max_index_bytes ({LIMITS.max_index_bytes}); {LIMITS.hint('max_index_bytes')}."
        )
    for info in infos.values():
        _check_zip_sizes(info, file_bytes, where)

    with zf.open(infos["header.npy"]) as f:
        shape, _, dtype = _npy_header(f, infos["header.npy"], where)
        if dtype != np.uint8 or len(shape) != 1:
            raise bad("the header is not a byte array")
        if shape[0] > LIMITS.max_json_bytes:
            raise InputError(
                f"{where}: its header is {shape[0]} bytes, more than edgemm.limits.max_json_bytes "
                f"({LIMITS.max_json_bytes}); {LIMITS.hint('max_json_bytes')}."
            )
        dim, metric, ids, metadata, header = parse_header(f.read(shape[0]), where, "exact")

    with zf.open(infos["vectors.npy"]) as f:
        shape, fortran_order, dtype = _npy_header(f, infos["vectors.npy"], where)
        if dtype != np.float32 or len(shape) != 2 or shape[1] != dim:
            raise bad(f"vectors have dtype {dtype} and shape {shape}, expected float32 (N, {dim})")
        n = shape[0]
        if fortran_order:
            raise bad("vectors are stored in Fortran (column) order; save() writes C order")
        check_counts(header, n, ids, metadata, where)

        store = _ExactStore(dim, capacity=n)
        rows = max(1, _READ_CHUNK_BYTES // (4 * dim))
        for start in range(0, n, rows):
            block = store._data[start : min(n, start + rows)]
            data = f.read(block.nbytes)
            if len(data) != block.nbytes:
                raise bad("the vectors are cut short")
            block[:] = np.frombuffer(data, dtype=np.float32).reshape(block.shape)
            _check_loaded_rows(block, start, ids, metric, where)
        store._n = n
    return store, dim, metric, ids, metadata, header


def check_counts(header: dict, n: int, ids: list, metadata: list, where: str) -> None:
    """The header's ids, metadata and count must all describe the file's ``n`` vectors."""
    bad = functools.partial(not_index, where)
    if len(ids) != n:
        raise bad(f"it has {n} vectors but {len(ids)} ids")
    if len(metadata) != n:
        raise bad(f"it has {n} vectors but the metadata list has {len(metadata)} entries")
    count = header.get("count", n)  # save() writes it; hand-made files may leave it out
    if isinstance(count, bool) or not isinstance(count, int) or count != n:
        raise bad(f"its header says count {count!r} but it has {n} vectors")


def not_index(where: str, why: str) -> InputError:
    return InputError(f"{where} is not a valid edgemm index file: {why}.")



def _check_zip_sizes(info: zipfile.ZipInfo, file_bytes: int, where: str) -> None:
    """Refuse sizes in the zip directory that the stored bytes cannot produce (a zip bomb's lie)."""
    bad = functools.partial(not_index, where)
    if info.header_offset + info.compress_size > file_bytes:
        raise bad(f"{info.filename} claims {info.compress_size} stored bytes, beyond the end of the file")
    if info.compress_type == zipfile.ZIP_STORED:
        possible = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        possible = info.file_size <= info.compress_size * _MAX_DEFLATE_RATIO
    else:
        raise bad(f"{info.filename} uses zip compression method {info.compress_type}; "
                  "index files hold stored or deflated members")
    if not possible:
        raise bad(f"{info.filename} declares {info.file_size} bytes from {info.compress_size} stored, "
                  "more than its compression can produce")


def _npy_header(f: IO[bytes], info: zipfile.ZipInfo, where: str) -> tuple[tuple, bool, np.dtype]:
    """Read a member's .npy header and check that it accounts for exactly the member's declared size."""
    bad = functools.partial(not_index, where)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise bad(f"{info.filename} has .npy format version {version}; index files use 1.0 or 2.0")
    needed = f.tell() + math.prod(shape) * dtype.itemsize
    if needed != info.file_size:
        raise bad(f"{info.filename} declares {info.file_size} bytes, but its header and {dtype} array "
                  f"of shape {shape} take {needed}")
    return shape, fortran_order, dtype


def parse_header(data: bytes, where: str, kind: str) -> tuple[int, str, list, list, dict]:
    """The JSON header's fields common to both kinds, checked: ``(dim, metric, ids, metadata, header)``."""
    bad = functools.partial(not_index, where)

    header = parse_json(data, f"{where} (its JSON header)", InputError)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise bad(f"format name is not {FORMAT_NAME!r}")
    # Exact files written before the HNSW kind existed have no "kind".
    if header.get("kind", "exact") != kind:
        raise bad(f"its header says kind {header.get('kind')!r}, but the file is laid out as a {kind} index")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"format version {version!r} is not a positive int")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{where} uses index format version {version}, but this edgemm reads "
            f"up to version {FORMAT_VERSION}; upgrade edgemm (pip install -U edgemm) to load it."
        )
    dim, metric = header.get("dim"), header.get("metric")
    ids, metadata = header.get("ids"), header.get("metadata")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise bad(f"dim {dim!r} is not a positive int")
    if dim > LIMITS.max_dim:
        raise InputError(f"{where} has dim {dim}, more than edgemm.limits.max_dim "
                         f"({LIMITS.max_dim}); {LIMITS.hint('max_dim')}.")
    if metric not in METRICS:
        raise bad(f"metric {metric!r} is unknown")
    if not isinstance(ids, list):
        raise bad("its header has no list of ids")
    # json gives exact types (bool is not int here), so sets of types check 100k entries in C.
    if not set(map(type, ids)) <= {int, str} or len(set(ids)) != len(ids):
        raise bad("ids must be unique ints or strings")
    if not isinstance(metadata, list) or not set(map(type, metadata)) <= {dict, type(None)}:
        raise bad("metadata must be a list of dicts or nulls")
    depth = _depth(metadata) - 1
    if depth > _MAX_METADATA_DEPTH:
        raise bad(f"metadata nests {depth} levels deep, more than the {_MAX_METADATA_DEPTH} add() accepts")
    return dim, metric, ids, metadata, header


def _check_loaded_rows(block: np.ndarray, first: int, ids: list, metric: str, where: str) -> None:
    """Refuse non-finite rows (and zero rows under cosine); normalise rows a foreign writer left unnormalised."""
    # A float64 norm is finite exactly when every float32 in the row is.
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    broken = ~np.isfinite(norms) | ((norms == 0) if metric == "cosine" else False)
    if broken.any():
        r = int(np.flatnonzero(broken)[0])
        what = ("NaN or infinite values" if norms[r] != 0
                else "zero norm, which has no direction under the cosine metric")
        raise not_index(where, f"vector {first + r} (id {ids[first + r]!r}) has {what}")
    if metric == "cosine":
        off = np.flatnonzero(np.abs(norms - 1) > _NORM_TOLERANCE)
        if off.size:
            block[off] = (block[off] / norms[off, None]).astype(np.float32)


def _depth(data: Any) -> int:
    """Nesting depth of JSON data's lists and dicts (a scalar is 0), level by level: no recursion."""
    depth, level = 0, [data]
    while level := [o for o in level if type(o) in _JSON_CONTAINERS]:
        depth += 1
        level = [v for o in level for v in (o.values() if type(o) is dict else o)]
    return depth


def _rerank(query: int, hits: list[Hit], vectors: np.ndarray | None,
            reranker: Callable[[int, np.ndarray, Sequence[Hit]], np.ndarray], k: int) -> list[Hit]:
    if not hits:
        return []
    scores = np.asarray(reranker(query, vectors, hits), dtype=np.float64).reshape(-1)
    if len(scores) != len(hits) or not np.isfinite(scores).all():
        raise InputError(f"the reranker returned {len(scores)} scores for {len(hits)} hits (or non-finite ones); "
                         "it must return one finite score per hit.")
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(hits[i].id, float(scores[i]), hits[i].metadata) for i in order]


def _check_metadata(metadata: Sequence[dict | None] | None, n_new: int) -> list[dict | None]:
    """Validate metadata and return its JSON round trip (what save/load would give back)."""
    if metadata is None:
        return [None] * n_new
    if isinstance(metadata, (dict, str, bytes)):
        raise InputError(
            f"metadata must be a sequence with one dict (or None) per vector, got a single "
            f"{type(metadata).__name__}; wrap it in a list, e.g. metadata=[{{...}}]."
        )
    try:
        metadata = list(metadata)
    except TypeError:
        raise InputError(f"metadata must be a sequence of dicts, got {type(metadata).__name__}.") from None
    if len(metadata) != n_new:
        raise InputError(
            f"Got {len(metadata)} metadata entries for {n_new} vectors; pass exactly one dict (or None) per vector."
        )
    for pos, m in enumerate(metadata):
        if m is not None and not isinstance(m, dict):
            raise InputError(f"metadata[{pos}] is a {type(m).__name__}; each entry must be a dict or None.")
    try:
        # One dumps for the whole batch; only on failure look for the culprit.
        stored = json.loads(json.dumps(metadata, allow_nan=False))
    except RecursionError:
        raise InputError(f"metadata nests too deeply; at most {_MAX_METADATA_DEPTH} levels are allowed.") from None
    except (TypeError, ValueError):
        for pos, m in enumerate(metadata):
            try:
                json.dumps(m, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise InputError(
                    f"metadata[{pos}] is not JSON-serialisable ({e}); use only dicts, lists, "
                    "strings, finite numbers, booleans and None."
                ) from e
        raise
    if _depth(stored) - 1 > _MAX_METADATA_DEPTH:
        pos, depth = next((pos, d) for pos, m in enumerate(stored) if (d := _depth(m)) > _MAX_METADATA_DEPTH)
        raise InputError(
            f"metadata[{pos}] nests {depth} levels deep; at most {_MAX_METADATA_DEPTH} are allowed "
            "(so that a saved index loads again); flatten it."
        )
    return stored


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    """L2-normalise rows; the norm is taken in float64 so tiny or huge float32 rows survive."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise InputError(
            f"{name} row(s) {zero[:10].tolist()} have zero norm, which has no direction under "
            "the cosine metric; drop them or use metric='ip'."
        )
    # Scale in float32 (a float64 temporary of a 100k x 384 add costs more than the add);
    # only rows whose scale overflows float32 (subnormal inputs) take the float64 path.
    with np.errstate(over="ignore", invalid="ignore"):
        scale = (1.0 / norms).astype(np.float32)
        out = x * scale[:, None]
    odd = np.flatnonzero(~np.isfinite(scale))
    if odd.size:
        out[odd] = (x[odd] / norms[odd, None]).astype(np.float32)
    return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row of ``scores`` (Q, n), best first.

    A full ``argpartition`` over 100k columns costs about a third of the matrix
    product, so the columns are first split into ``g`` interleaved groups of size
    ``b`` (column ``j + i*g`` is in group ``j``). The k groups with the largest
    maxima contain the top k: a column outside them is beaten by those k maxima.
    That leaves a cheap elementwise max, a partition over ``g`` group maxima and
    one over ``k*b`` candidates, instead of one over ``n``.

    Returns:
        ``(rows, values)``, both (Q, k): column indices and their scores.
    """
    q, n = scores.shape
    # b ~ sqrt(n/k) balances the g = n/b group maxima against the k*b candidates.
    b = int(math.sqrt(n / k))
    if b < 4:
        cand = np.broadcast_to(np.arange(n), (q, n))
        cand_scores = scores
    else:
        g = n // b
        body = scores[:, : g * b].reshape(q, b, g)
        group_max = body.max(axis=1)
        top_groups = np.argpartition(group_max, g - k, axis=1)[:, g - k :]
        cand = (top_groups[:, :, None] + (np.arange(b) * g)[None, None, :]).reshape(q, k * b)
        if g * b < n:
            # The tail columns that did not fill a whole group are always candidates.
            tail = np.broadcast_to(np.arange(g * b, n), (q, n - g * b))
            cand = np.concatenate([cand, tail], axis=1)
        cand_scores = np.take_along_axis(scores, cand, axis=1)
    m = cand_scores.shape[1]
    if k < m:
        part = np.argpartition(cand_scores, m - k, axis=1)[:, m - k :]
        cand = np.take_along_axis(cand, part, axis=1)
        cand_scores = np.take_along_axis(cand_scores, part, axis=1)
    order = np.argsort(-cand_scores, axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(cand_scores, order, axis=1)


def _valid_id(i: object) -> bool:
    return (isinstance(i, int) and not isinstance(i, bool)) or isinstance(i, str)
