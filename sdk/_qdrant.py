"""``QdrantIndex``: the ``VectorIndex`` API over a Qdrant collection (a server, a local folder, or memory).

Qdrant point ids must be unsigned ints or UUIDs, while edgemm ids are any int or
str, and ``1`` and ``"1"`` are different ids. So every id becomes the point id
``uuid5(_NAMESPACE, "int:1")`` (or ``"str:1"``), the same on every machine, and the
id itself is kept in the point's payload (``edgemm_id``, beside ``metadata``), from
which hits, ``ids`` and ``get`` read it back with its type. The next auto-assigned
id lives in the collection's metadata (Qdrant 1.16 and later).

Filters: a dict of ``{field: value}`` (or ``{field: [values]}``) conditions on the
metadata is sent to Qdrant and runs there, at any selectivity; a callable
``filter(metadata) -> bool`` cannot travel, so it runs here on over-fetched hits.

Example:
    >>> index = QdrantIndex("http://localhost:6333", "photos", dim=384)   # or ":memory:", or a folder
    >>> index.add(vectors, ids=paths, metadata=[{"camera": "cam0"} for _ in paths])
    >>> index.search(query, k=5, filter={"camera": "cam0"})
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from edgemm._index import (
    BaseIndex,
    Filter,
    Hit,
    IndexId,
    already_present,
    check_dim,
    check_metric,
    check_new_entries,
    check_queries,
    id_list,
    lookup_key,
    next_int_id,
    unknown_id,
)
from edgemm.runtime.errors import InputError, require

__all__ = ["QdrantIndex"]

_NAMESPACE = uuid.UUID("5b0c4f0e-6a43-5e9b-9a52-2d1f0c6e7e31")  # fixed: the same id maps to the same point anywhere
_ID_FIELD, _META_FIELD = "edgemm_id", "metadata"
_BATCH = 256  # points per upsert: one request stays well under Qdrant's 32 MiB body limit at dim 4096
_FIRST_FETCH = 4  # a callable filter first fetches this many times k hits, then 4 times more each round


class QdrantIndex(BaseIndex):
    """A Qdrant collection behind ``VectorIndex``'s API: add, search, remove, get, ids, ``len``, ``in``.

    Behaves like ``VectorIndex`` (ids keep their type, metadata is its JSON round
    trip, the same checks and ``InputError`` messages, empty results from an empty
    collection) except that: search is Qdrant's (exact in local mode, HNSW on a
    server); ``ids`` come in Qdrant's order, not insertion order; there is no
    ``save``/``load``, since Qdrant stores every change itself; and one process at
    a time should add with automatic ids (the counter is read, then written).

    Args:
        location: ``":memory:"``, a local folder (Qdrant's embedded mode, one
            process at a time), or a server URL such as ``"http://localhost:6333"``.
        collection: Collection name; created when missing.
        dim: Vector length; needed to create the collection, checked against an
            existing one.
        metric: ``"cosine"`` or ``"ip"`` (Qdrant's ``Cosine`` / ``Dot``), checked
            against an existing collection.
        api_key: For a server that requires one.

    Raises:
        InputError: ``dim`` or ``metric`` is invalid or disagrees with the existing
            collection, or ``dim`` is missing for a new one.
        MissingDependencyError: qdrant-client is not installed.
    """

    def __init__(self, location: str | os.PathLike, collection: str, dim: int | None = None,
                 metric: str = "cosine", *, api_key: str | None = None) -> None:
        qdrant_client = require("qdrant_client", "qdrant", "QdrantIndex")
        self._models = qdrant_client.models
        metric = check_metric(metric)
        if not isinstance(collection, str) or not collection:
            raise InputError(f"collection must be a non-empty str, got {collection!r}.")
        where = os.fspath(location)
        if where == ":memory:":
            self._client = qdrant_client.QdrantClient(":memory:")
        elif where.startswith(("http://", "https://")):
            self._client = qdrant_client.QdrantClient(url=where, api_key=api_key)
        else:
            self._client = qdrant_client.QdrantClient(path=where)
        self._location, self._collection = where, collection
        self._lock = threading.RLock()
        distance = {"cosine": self._models.Distance.COSINE, "ip": self._models.Distance.DOT}[metric]
        if self._client.collection_exists(collection):
            params = self._client.get_collection(collection).config.params.vectors
            have = {v: k for k, v in {"cosine": self._models.Distance.COSINE, "ip": self._models.Distance.DOT}.items()}
            if not hasattr(params, "size") or params.distance not in have:
                raise InputError(f"Qdrant collection {collection!r} at {where} has named or {params!r} vectors; "
                                 "QdrantIndex uses one unnamed Cosine or Dot vector per point.")
            if dim is not None and check_dim(dim) != params.size:
                raise InputError(f"Qdrant collection {collection!r} at {where} holds {params.size}-d vectors, "
                                 f"not {dim}-d.")
            if have[params.distance] != metric:
                raise InputError(f"Qdrant collection {collection!r} at {where} uses metric "
                                 f"{have[params.distance]!r}, not {metric!r}.")
            self._dim = params.size
        else:
            if dim is None:
                raise InputError(f"Qdrant collection {collection!r} does not exist at {where}; pass dim= to "
                                 "create it.")
            self._dim = check_dim(dim)
            self._client.create_collection(
                collection, vectors_config=self._models.VectorParams(size=self._dim, distance=distance),
                metadata={"edgemm_next_id": 0})
        self._metric = metric

    # ------------------------------------------------------------------ basics

    @property
    def kind(self) -> str:
        """``"qdrant"``."""
        return "qdrant"

    @property
    def ids(self) -> list[IndexId]:
        """Every id in the collection, in Qdrant's order (by point id), scrolled page by page."""
        with self._lock:
            out: list[IndexId] = []
            offset = None
            while True:
                records, offset = self._client.scroll(self._collection, limit=1024, offset=offset,
                                                      with_payload=[_ID_FIELD], with_vectors=False)
                out.extend(_original_id(r) for r in records)
                if offset is None:
                    return out

    def __len__(self) -> int:
        with self._lock:
            return self._client.count(self._collection, exact=True).count

    def __contains__(self, id: object) -> bool:
        key = lookup_key(id)
        if not isinstance(key, (int, str)):
            return False
        with self._lock:
            return bool(self._client.retrieve(self._collection, [_point_id(key)], with_payload=False))

    def __repr__(self) -> str:
        return (f"QdrantIndex({self._location!r}, {self._collection!r}, dim={self._dim}, metric={self._metric!r}, "
                f"size={len(self)})")

    def get(self, id: IndexId) -> tuple[np.ndarray, dict | None]:
        """Return one stored vector (normalised under cosine, as Qdrant stores it) and a copy of its metadata.

        Raises:
            InputError: If the id is not in the collection.
        """
        key = lookup_key(id)
        with self._lock:
            found = (self._client.retrieve(self._collection, [_point_id(key)], with_payload=True, with_vectors=True)
                     if isinstance(key, (int, str)) else [])
        if not found:
            raise unknown_id(id)
        return np.asarray(found[0].vector, dtype=np.float32), copy.deepcopy((found[0].payload or {}).get(_META_FIELD))

    def close(self) -> None:
        """Close the client (a local folder is then free for another process)."""
        self._client.close()

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ mutate

    def add(self, vectors: Any, ids: Sequence[IndexId] | None = None,
            metadata: Sequence[dict | None] | None = None) -> list[IndexId]:
        """Add vectors, with optional ids and metadata (as ``VectorIndex.add``).

        Returns:
            The ids of the added vectors, in order.

        Raises:
            InputError: As ``VectorIndex.add``; also when automatic ids are asked
                of a server too old to keep collection metadata (pass ids=).
        """
        with self._lock:
            next_id = self._next_id() if ids is None else 0
            if next_id is None:
                raise InputError(f"Qdrant at {self._location} keeps no collection metadata (it is older than 1.16), "
                                 "so edgemm cannot count automatic ids there; pass ids=.")
            x, new_ids, new_meta = check_new_entries(vectors, ids, metadata, self._dim, self._metric, next_id)
            points = [_point_id(i) for i in new_ids]
            present = [_original_id(r) for start in range(0, len(points), _BATCH * 4)
                       for r in self._client.retrieve(self._collection, points[start : start + _BATCH * 4],
                                                      with_payload=[_ID_FIELD])]
            if present:
                raise already_present(present)
            point = self._models.PointStruct
            for start in range(0, len(points), _BATCH):
                self._client.upsert(self._collection, wait=True, points=[
                    point(id=p, vector=v, payload={_ID_FIELD: i, _META_FIELD: m})
                    for p, v, i, m in zip(points[start : start + _BATCH], x[start : start + _BATCH].tolist(),
                                          new_ids[start : start + _BATCH], new_meta[start : start + _BATCH])])
            stored = self._next_id()
            if stored is not None:
                self._client.update_collection(self._collection,
                                               metadata={"edgemm_next_id": next_int_id(stored, new_ids)})
            return new_ids

    def remove(self, ids: Iterable[IndexId] | IndexId) -> int:
        """Remove points by id.

        Returns:
            How many were removed.

        Raises:
            InputError: If an id is not in the collection or is given twice; nothing is removed then.
        """
        with self._lock:
            ids = id_list(ids)
            keys = [lookup_key(i) for i in ids]
            for i, key in zip(ids, keys):
                if not isinstance(key, (int, str)):
                    raise unknown_id(i)
            if len(set(keys)) != len(keys):
                raise InputError("ids passed to remove() contain duplicates; pass each id once.")
            if not keys:
                return 0
            points = [_point_id(key) for key in keys]
            found = {r.id for start in range(0, len(points), _BATCH * 4)
                     for r in self._client.retrieve(self._collection, points[start : start + _BATCH * 4],
                                                    with_payload=False)}
            missing = [i for i, p in zip(ids, points) if p not in found]
            if missing:
                raise unknown_id(missing[0])
            self._client.delete(self._collection, points_selector=self._models.PointIdsList(points=points), wait=True)
            return len(points)

    # ------------------------------------------------------------------ search

    def _search(self, queries: Any, k: int, filter: Filter | dict | None, keep_vectors: bool,
                ef_search: int | None) -> list[tuple[list[Hit], np.ndarray | None]]:
        """One Qdrant query per query (sent as one batch); a callable filter over-fetches and filters here."""
        server_filter = None
        if isinstance(filter, dict):
            server_filter, filter = self._conditions(filter), None
        elif filter is not None and not callable(filter):
            raise InputError(f"filter must be a callable metadata -> bool or a dict of metadata field: value "
                             f"conditions, got {type(filter).__name__}.")
        params = None if ef_search is None else self._models.SearchParams(hnsw_ef=ef_search)
        with self._lock:
            q = check_queries(queries, self._dim, self._metric)
            if q.shape[0] == 0:
                return []
            total = self._client.count(self._collection, exact=True).count
            if total == 0:
                return [([], None) for _ in range(q.shape[0])]
            results: list[tuple[list[Hit], np.ndarray | None]] = [([], None)] * q.shape[0]
            pending = list(range(q.shape[0]))
            fetch = min(total, k if filter is None else _FIRST_FETCH * k)
            while pending:
                answers = self._client.query_batch_points(self._collection, requests=[
                    self._models.QueryRequest(query=q[i].tolist(), limit=fetch, filter=server_filter, params=params,
                                              with_payload=True, with_vector=keep_vectors) for i in pending])
                still = []
                for i, answer in zip(pending, answers):
                    points = [p for p in answer.points if filter is None
                              or filter((p.payload or {}).get(_META_FIELD))][:k]
                    # Done when k hits passed, or Qdrant returned fewer than asked: nothing more matches.
                    if len(points) == k or len(answer.points) < fetch or fetch >= total:
                        results[i] = self._hits(points, keep_vectors)
                    else:
                        still.append(i)
                pending, fetch = still, min(total, fetch * 4)
            return results

    def _hits(self, points: list, keep_vectors: bool) -> tuple[list[Hit], np.ndarray | None]:
        hits = [Hit(_original_id(p), float(p.score), (p.payload or {}).get(_META_FIELD)) for p in points]
        vectors = (np.asarray([p.vector for p in points], dtype=np.float32).reshape(len(points), self._dim)
                   if keep_vectors else None)
        return hits, vectors

    def _conditions(self, conditions: dict) -> Any:
        """A dict of metadata equality conditions as a Qdrant filter (all must hold)."""
        models = self._models
        must = []
        for field, value in conditions.items():
            if not isinstance(field, str) or not field:
                raise InputError(f"filter keys must be metadata field names (non-empty str), got {field!r}.")
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, (str, int)) for v in values):
                raise InputError(f"filter[{field!r}] must be a str, int or bool, or a non-empty list of them, "
                                 f"got {value!r}; use a callable filter for other tests.")
            match = (models.MatchValue(value=values[0]) if not isinstance(value, list)
                     else models.MatchAny(any=values))
            must.append(models.FieldCondition(key=f"{_META_FIELD}.{field}", match=match))
        return models.Filter(must=must)

    def _next_id(self) -> int | None:
        """The stored counter of automatic ids, or None where the server keeps no collection metadata."""
        stored = (self._client.get_collection(self._collection).config.metadata or {}).get("edgemm_next_id")
        return stored if isinstance(stored, int) and not isinstance(stored, bool) else None


def _point_id(id: IndexId) -> str:
    """The Qdrant point id of an edgemm id: a UUID, the same everywhere; ints and strs never collide."""
    return str(uuid.uuid5(_NAMESPACE, f"{'int' if isinstance(id, int) else 'str'}:{id}"))


def _original_id(point: Any) -> IndexId:
    """The edgemm id a point was added with; a point another program added keeps its Qdrant id."""
    return (point.payload or {}).get(_ID_FIELD, point.id)
