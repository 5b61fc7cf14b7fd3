"""QdrantIndex against qdrant-client's local mode (in memory and in a folder): the VectorIndex API over Qdrant."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from edgemm import Hit, QdrantIndex, VectorIndex  # noqa: E402
from edgemm.runtime.errors import InputError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ids(results: list[list[Hit]]) -> list[list]:
    return [[h.id for h in hits] for hits in results]


@pytest.fixture(params=["memory", "folder"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return ":memory:" if request.param == "memory" else str(tmp_path / "qdrant")


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((6, 16)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_search_ranks_as_the_exact_index_does(location: str, data, metric: str) -> None:
    vectors, queries = data
    meta = [{"i": i, "colour": ["red", "green", "blue"][i % 3]} for i in range(300)]
    with QdrantIndex(location, "c", dim=16, metric=metric) as index:
        assert index.add(vectors, metadata=meta) == list(range(300))
        exact = VectorIndex(16, metric=metric)
        exact.add(vectors, metadata=meta)
        got, want = index.search(queries, k=8), exact.search(queries, k=8)
        assert _ids(got) == _ids(want)  # local mode searches exactly
        np.testing.assert_allclose([h.score for r in got for h in r], [h.score for r in want for h in r], atol=1e-5)
        assert [h.metadata for h in got[0]] == [h.metadata for h in want[0]]
        assert index.search(np.empty((0, 16))) == [] and len(index.search(queries[0], k=500)[0]) == 300


def test_ids_keep_their_type_and_metadata_round_trips(location: str) -> None:
    with QdrantIndex(location, "ids", dim=3, metric="ip") as index:
        added = index.add(np.eye(3), ids=[1, "1", "cam0/001.jpg"],
                          metadata=[{"pair": (1, 2)}, None, {"nested": {"k": [True, None]}}])
        assert added == [1, "1", "cam0/001.jpg"]
        assert 1 in index and "1" in index and 2 not in index and 1.0 not in index and None not in index
        assert sorted(index.ids, key=lambda i: (type(i).__name__, i)) == [1, "1", "cam0/001.jpg"]
        assert {type(i) for i in index.ids} == {int, str}
        vector, meta = index.get(1)
        np.testing.assert_array_equal(vector, [1, 0, 0])
        assert meta == {"pair": [1, 2]} and index.get("1")[1] is None
        (hits,) = index.search([0.0, 0.0, 1.0], k=1)
        assert hits == [Hit("cam0/001.jpg", 1.0, {"nested": {"k": [True, None]}})]
        with pytest.raises(InputError, match=r"ids \[1\] are already in the index"):
            index.add(np.ones((2, 3)), ids=["new", 1])
        assert len(index) == 3
        with pytest.raises(InputError, match="Unknown id 2"):
            index.get(2)


def test_remove_is_all_or_nothing(location: str, data) -> None:
    vectors, queries = data
    with QdrantIndex(location, "rm", dim=16) as index:
        index.add(vectors[:10], ids=list(range(10)))
        with pytest.raises(InputError, match="Unknown id 'x'"):
            index.remove([1, "x"])
        with pytest.raises(InputError, match="duplicates"):
            index.remove([2, 2])
        with pytest.raises(InputError, match="Unknown id '3'"):
            index.remove(["3"])  # the str "3" is not the int 3
        assert len(index) == 10
        best = index.search(vectors[4], k=1)[0][0].id
        assert best == 4 and index.remove(4) == 1 and index.remove([]) == 0
        assert 4 not in index and len(index) == 9 and index.search(vectors[4], k=1)[0][0].id != 4


def test_a_folder_keeps_everything_including_the_auto_id_counter(tmp_path: Path, data) -> None:
    vectors, _ = data
    folder = str(tmp_path / "q")
    with QdrantIndex(folder, "photos", dim=16) as index:
        assert index.add(vectors[:3]) == [0, 1, 2]
        index.add(vectors[3:4], ids=[10])
        index.remove([10, 2])
    # Another process, as the CLI would be: the folder is all it shares.
    code = textwrap.dedent(f"""
        import numpy as np
        from edgemm import QdrantIndex
        with QdrantIndex({folder!r}, "photos") as index:
            print(index.dim, index.metric, len(index), index.get(1)[0].shape, index.add(np.ones(16)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.stdout.split() == ["16", "cosine", "2", "(16,)", "[11]"], out.stderr  # 10 was used: not reused
    with QdrantIndex(folder, "photos", dim=16) as index:
        assert sorted(index.ids) == [0, 1, 11]


def test_dict_filters_run_in_qdrant_and_callables_here_both_returning_k(location: str, data) -> None:
    vectors, queries = data
    meta = [{"colour": ["red", "green", "blue"][i % 3], "shard": i % 50} for i in range(300)]
    with QdrantIndex(location, "f", dim=16) as index:
        index.add(vectors, metadata=meta)
        exact = VectorIndex(16)
        exact.add(vectors, metadata=meta)
        red = index.search(queries, k=5, filter={"colour": "red"})
        assert _ids(red) == _ids(exact.search(queries, k=5, filter=lambda m: m["colour"] == "red"))
        either = index.search(queries, k=5, filter={"colour": ["red", "blue"], "shard": 3})
        assert _ids(either) == _ids(exact.search(
            queries, k=5, filter=lambda m: m["colour"] in ("red", "blue") and m["shard"] == 3))
        # 6 of 300 match: a callable over-fetches until it has k, or everything was seen.
        rare = index.search(queries, k=5, filter=lambda m: m["shard"] == 7)
        assert all(len(hits) == 5 for hits in rare)
        assert _ids(rare) == _ids(exact.search(queries, k=5, filter=lambda m: m["shard"] == 7))
        assert [len(h) for h in index.search(queries, k=10, filter=lambda m: m["shard"] == 7)] == [6] * 6
        assert index.search(queries[0], filter={"colour": "purple"}) == [[]]
        for bad, message in [({"colour": 1.5}, "must be a str, int or bool"), ({"": 1}, "non-empty str"),
                             ({"c": []}, "non-empty list"), ("colour", "callable metadata -> bool or a dict")]:
            with pytest.raises(InputError, match=message):
                index.search(queries[0], filter=bad)


def test_rerank_gets_the_candidates_vectors(data) -> None:
    vectors, queries = data
    with QdrantIndex(":memory:", "rr", dim=16) as index:
        index.add(vectors)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)

        def negated(q: int, candidates: np.ndarray, hits: list) -> np.ndarray:
            np.testing.assert_allclose(candidates @ unit[q], [h.score for h in hits], atol=1e-5)
            return -np.array([h.score for h in hits])

        plain = index.search(queries, k=10)
        assert _ids(index.search(queries, k=3, rerank=10, reranker=negated)) == [i[::-1][:3] for i in _ids(plain)]


def test_collection_checks_and_the_same_input_errors(tmp_path: Path) -> None:
    folder = str(tmp_path / "q")
    with pytest.raises(InputError, match="does not exist .* pass dim= to create it"):
        QdrantIndex(folder, "new")
    QdrantIndex(folder, "c", dim=8, metric="ip").close()
    with pytest.raises(InputError, match="holds 8-d vectors, not 4-d"):
        QdrantIndex(folder, "c", dim=4, metric="ip")
    with pytest.raises(InputError, match="uses metric 'ip', not 'cosine'"):
        QdrantIndex(folder, "c")
    with pytest.raises(InputError, match="Unknown metric 'l2'"):
        QdrantIndex(folder, "c", metric="l2")
    with QdrantIndex(folder, "c", metric="ip") as index:
        assert (index.dim, index.metric, index.kind, len(index)) == (8, "ip", "qdrant", 0)
        assert index.search(np.ones((2, 8))) == [[], []]
        for call, message in [(lambda: index.add(np.ones((2, 5))), "dimension 5, expected 8"),
                              (lambda: index.add(np.array([[np.nan] * 8])), "NaN or infinite"),
                              (lambda: index.add(np.ones((1, 8)), ids=[True]), "ids must be int or str"),
                              (lambda: index.add(np.ones((2, 8)), metadata=[{}]), "1 metadata entries for 2"),
                              (lambda: index.search(np.ones(8), k=0), "k must be a positive int"),
                              (lambda: index.search(np.ones(7)), "dimension 7, expected 8")]:
            with pytest.raises(InputError, match=message):
                call()
        assert len(index) == 0
