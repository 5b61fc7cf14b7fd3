"""The edgemm command line, run for real on the default bundle."""

from __future__ import annotations

import json

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
    import subprocess
    import sys
    from pathlib import Path

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
])
def test_errors_exit_2_with_a_message(default_bundle, image_dir, tmp_path, args, message):
    args = [str(image_dir / "skimage.chelsea.jpg") if a == "IMG" else str(tmp_path / "o") if a == "OUT" else a
            for a in args]
    if args[0] in ("classify", "embed"):
        args += ["--bundle", str(default_bundle)]
    out = run(*args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
