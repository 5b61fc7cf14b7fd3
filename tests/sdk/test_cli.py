"""The edgemm command line, run for real on the default bundle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemm.runtime.manifest import SCHEMA_VERSION
from clirun import run_cli as run


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("images")
    for p in photos[:7]:
        Image.fromarray(p.image).save(d / f"{p.name}.jpg", quality=95)
    return d


def test_the_console_script_is_installed_next_to_this_python():
    script = Path(sys.executable).parent / "edgemm"
    assert script.is_file(), "pip install -e . should install the edgemm console script"
    out = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "classify-av" in out.stdout and "train" in out.stdout


def test_info(default_bundle):
    out = run("info", default_bundle)
    assert "dual_encoder" in out.stdout and "image_encoder.onnx" in out.stdout and "verified" in out.stdout
    data = json.loads(run("info", default_bundle, "--json").stdout)
    assert data["schema_version"] == SCHEMA_VERSION and data["embedding_dim"] == 384


def test_classify_json(default_bundle, image_dir):
    out = run("classify", image_dir / "skimage.chelsea.jpg", image_dir / "skimage.coffee.jpg", "--bundle",
              default_bundle, "--labels", "cat", "cup of coffee", "rocket", "--json", "--threads", "2")
    data = json.loads(out.stdout)
    assert [d["predictions"][0]["label"] for d in data] == ["cat", "cup of coffee"]


def test_embed_texts_to_npy(default_bundle, tmp_path):
    run("embed", "--texts", "a red car", "a cat", "--bundle", default_bundle, "-o", tmp_path / "t.npy")
    vectors = np.load(tmp_path / "t.npy")
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_index_add_and_search(default_bundle, image_dir, tmp_path):
    index = tmp_path / "photos.idx"
    out = run("index", "add", index, image_dir, "--bundle", default_bundle, "-q")
    assert "added 7 images" in out.stdout
    out = run("index", "add", index, image_dir, "--bundle", default_bundle, "-q")
    assert "added 0 images" in out.stdout and "holds 7" in out.stdout  # already indexed ones are skipped
    hits = json.loads(run("index", "search", index, "--text", "a rocket launch", "-k", "2", "--bundle",
                          default_bundle, "--json").stdout)
    assert hits[0]["metadata"]["path"].endswith("skimage.rocket.jpg")


def test_index_kind_hnsw_is_chosen_at_creation_and_kept(default_bundle, image_dir, tmp_path):
    pytest.importorskip("faiss")
    from edgemm._index import VectorIndex

    index = tmp_path / "photos.idx"
    out = json.loads(run("index", "add", index, image_dir, "--bundle", default_bundle, "-q", "--kind", "hnsw",
                         "--json").stdout)
    assert (out["added"], out["kind"]) == (7, "hnsw") and VectorIndex.load(index).kind == "hnsw"
    out = run("index", "add", index, image_dir, "--bundle", default_bundle, "-q", "--kind", "exact")
    assert "added 0 images" in out.stdout and "stays one" in out.stderr and VectorIndex.load(index).kind == "hnsw"
    for extra in ([], ["--mmap", "--ef-search", "32"]):
        hits = json.loads(run("index", "search", index, "--text", "a rocket launch", "-k", "2", "--bundle",
                              default_bundle, "--json", *extra).stdout)
        assert hits[0]["metadata"]["path"].endswith("skimage.rocket.jpg")
    exact = tmp_path / "exact.idx"
    run("index", "add", exact, image_dir, "--bundle", default_bundle, "-q")
    out = run("index", "search", exact, "--text", "a rocket", "--ef-search", "32", "--bundle", default_bundle,
              check=False)
    assert out.returncode == 2 and "ef_search applies to approximate indexes" in out.stderr


def test_index_add_and_search_a_qdrant_collection(default_bundle, image_dir, tmp_path):
    pytest.importorskip("qdrant_client")
    folder = tmp_path / "qdrant"
    where = ["--qdrant", folder, "--collection", "photos"]
    out = run("index", "add", *where, image_dir, "--bundle", default_bundle, "-q")
    assert "added 7 images" in out.stdout and "Qdrant collection 'photos'" in out.stdout
    out = run("index", "add", *where, image_dir, "--bundle", default_bundle, "-q")
    assert "added 0 images" in out.stdout and "holds 7" in out.stdout
    hits = json.loads(run("index", "search", *where, "--text", "a rocket launch", "-k", "2", "--bundle",
                          default_bundle, "--json").stdout)
    assert hits[0]["metadata"]["path"].endswith("skimage.rocket.jpg") and hits[0]["id"] == hits[0]["metadata"]["path"]
    for args, message in [(["search", tmp_path / "i.idx", *where, "--text", "x"], "either an index file or --qdrant"),
                          (["search", "--qdrant", folder, "--text", "x"], "--qdrant needs --collection"),
                          (["add", *where, image_dir, "--kind", "hnsw"], "a Qdrant collection indexes itself"),
                          (["add", tmp_path / "i.idx"], "at least one image")]:
        out = run("index", *args, "--bundle", default_bundle, check=False)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_eval_small(default_bundle):
    data = json.loads(run("eval", "--bundle", default_bundle, "--limit", "200", "--json", "-q").stdout)
    assert data["fashion_mnist"]["images"] == 200
    assert data["fashion_mnist"]["top1"] > 0.25  # chance is 0.10
    assert data["sample_photos"]["objects_correct"] >= 8


@pytest.mark.parametrize(("args", "message"), [
    (["classify", "/no/such.jpg"], "does not exist"),
    (["classify", "IMG", "--labels", "a", "a"], "more than once"),
    (["info", "/no/bundle"], "does not exist"),
    (["embed", "--texts", "x", "--images", "IMG"], "either --images or --texts"),
    (["export", "resnet", "-o", "OUT"], "invalid choice"),
    (["index", "add", "OUT", "IMG", "--batch-size", "0"], "positive integer"),
])
def test_errors_exit_2_with_a_message(default_bundle, image_dir, tmp_path, args, message):
    args = [str(image_dir / "skimage.chelsea.jpg") if a == "IMG" else str(tmp_path / "o") if a == "OUT" else a
            for a in args]
    if args[0] in ("classify", "embed"):
        args += ["--bundle", str(default_bundle)]
    out = run(*args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


# -- hardening: real files, real subprocesses ---------------------------------------------------------------

def _one_line_error(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("edgemm:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def _small_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = [folder / f"{i:03d}.jpg" for i in range(start, start + n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
    return paths


def _summary(out) -> tuple[int, int, int]:
    m = re.search(r"added (\d+) images, skipped (\d+) unreadable, (\d+) already present", out.stdout)
    assert m, out.stdout + out.stderr
    return tuple(map(int, m.groups()))


def test_index_add_reports_and_skips_unreadable_images(default_bundle, tmp_path):
    from edgemm._index import VectorIndex

    good = _small_images(tmp_path / "imgs", 3)
    truncated = tmp_path / "imgs" / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    text = tmp_path / "imgs" / "notes.jpg"
    text.write_text("not an image\n")
    index = tmp_path / "i.idx"
    args = ("index", "add", index, tmp_path / "imgs", "--bundle", default_bundle, "-q", "--batch-size", "2")
    out = run(*args)
    assert _summary(out) == (3, 2, 0)
    for bad in (truncated, text):
        assert f"edgemm: skipped {bad.resolve()}: " in out.stderr  # path and reason, one line each
    assert "Traceback" not in out.stderr
    assert sorted(VectorIndex.load(index).ids) == sorted(str(p.resolve()) for p in good)
    out = run(*args, "--strict", check=False)
    assert out.returncode == 1 and _summary(out) == (0, 2, 3)


def test_index_add_names_each_file_once(default_bundle, tmp_path):
    from edgemm._index import VectorIndex

    a, b, c = _small_images(tmp_path / "imgs", 3)
    (tmp_path / "link.jpg").symlink_to(a)
    index = tmp_path / "i.idx"
    args = ("index", "add", index, a, f"{tmp_path}/imgs/../imgs/{a.name}", tmp_path / "link.jpg", tmp_path / "imgs", b,
            "--bundle", default_bundle, "-q")
    assert _summary(run(*args)) == (3, 0, 0)
    assert VectorIndex.load(index).ids == [str(p.resolve()) for p in (a, b, c)]  # first-named order
    assert _summary(run(*args)) == (0, 0, 3)


def test_index_add_recognises_ids_of_older_indexes(default_bundle, tmp_path):
    """Indexes made before ids were resolved paths hold p.absolute(): those files count as present."""
    from edgemm._index import VectorIndex

    _small_images(tmp_path / "imgs", 2)
    (tmp_path / "via").symlink_to(tmp_path / "imgs")
    old = VectorIndex(384)
    first = tmp_path / "via" / "000.jpg"
    old.add(np.ones((1, 384), np.float32), ids=[str(first)], metadata=[{"path": str(first)}])
    old.save(tmp_path / "i.idx")
    out = run("index", "add", tmp_path / "i.idx", tmp_path / "via", "--bundle", default_bundle, "-q")
    assert _summary(out) == (1, 0, 1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_killed_index_add_keeps_its_checkpoints_and_a_rerun_continues(default_bundle, tmp_path, sig):
    from edgemm._index import VectorIndex

    images = _small_images(tmp_path / "imgs", 100)
    index = tmp_path / "i.idx"
    args = ["index", "add", index, tmp_path / "imgs", "--bundle", default_bundle, "-q", "--threads", "1",
            "--batch-size", "5", "--checkpoint-every", "10"]
    child = subprocess.Popen([sys.executable, "-m", "edgemm._cli", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not index.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # the index appears, whole, at the first checkpoint (saves are atomic renames)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == (-9 if sig == signal.SIGKILL else 130), err
    assert "Traceback" not in err
    kept = len(VectorIndex.load(index))
    assert 10 <= kept < 100
    assert _summary(run(*args)) == (100 - kept, 0, kept)  # the rerun embedded only the remainder
    assert sorted(VectorIndex.load(index).ids) == sorted(str(p.resolve()) for p in images)


def test_embed_prints_the_file_it_wrote(default_bundle, tmp_path):
    out = run("embed", "--texts", "a red car", "--bundle", default_bundle, "-o", tmp_path / "vectors")
    assert out.stdout.strip().endswith(f"to {tmp_path / 'vectors.npy'}")
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npy"]  # written atomically: no temp file left
    assert np.load(tmp_path / "vectors.npy").shape == (1, 384)
    line = _one_line_error(run("embed", "--texts", "x", "--bundle", default_bundle, "-o", tmp_path / "no" / "v.npy",
                               check=False))
    assert "does not exist" in line and str(tmp_path / "no") in line


def test_labels_file_that_is_not_utf8_is_one_error(default_bundle, image_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("café\nthé\n".encode("latin-1"))
    line = _one_line_error(run("classify", image_dir / "skimage.chelsea.jpg", "--labels-file", labels,
                               "--bundle", default_bundle, check=False))
    assert str(labels) in line and "save it as UTF-8" in line


@pytest.mark.parametrize("args", [["classify", "IMG", "--labels", "BYTES", "dog"], ["embed", "--texts", "BYTES"],
                                  ["match", "IMG", "BYTES"]])
def test_non_utf8_bytes_in_argv_texts_are_one_error(default_bundle, image_dir, args):
    # A byte that is not UTF-8 on the command line reaches sys.argv as a lone surrogate (PEP 383).
    args = [os.fsdecode(b"caf\xe9") if a == "BYTES" else str(image_dir / "skimage.chelsea.jpg") if a == "IMG" else a
            for a in args]
    line = _one_line_error(run(*args, "--bundle", default_bundle, check=False) if args[0] != "match"
                           else run(*args, check=False))
    assert "not UTF-8" in line and "caf" in line


def test_a_folder_nested_deeper_than_the_recursion_limit_is_one_error(default_bundle, tmp_path):
    deepest = [str(tmp_path / "deep") + "/a" * i for i in range(1200)]  # ~2.4k characters, under PATH_MAX
    for d in deepest:
        os.mkdir(d)
    try:
        line = _one_line_error(run("embed", "--images", deepest[0], "--bundle", default_bundle, check=False))
        assert "too deeply nested" in line
    finally:  # shutil.rmtree (and so pytest's cleanup) recurses too
        for d in reversed(deepest):
            os.rmdir(d)
