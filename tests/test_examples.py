"""The examples run for real against the default bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_camera_classify_on_an_image_file(default_bundle, photos, tmp_path):
    path = tmp_path / "cat.jpg"
    Image.fromarray(photos[1].image).save(path)
    out = subprocess.run([sys.executable, EXAMPLES / "camera_classify.py", path, "--bundle", default_bundle,
                          "--labels", "cat", "dog", "forklift", "--max-frames", "1"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"{path} #0: cat")
    assert out.stdout.splitlines()[-1].startswith(f"{path}: 1 processed, 0 dropped")


def test_folder_search(default_bundle, photos, tmp_path):
    for p in photos[:7]:
        Image.fromarray(p.image).save(tmp_path / f"{p.name}.png")
    out = subprocess.run([sys.executable, EXAMPLES / "folder_search.py", tmp_path, "a cup of espresso",
                          "--bundle", default_bundle, "-k", "1"], capture_output=True, text=True, check=True)
    assert "skimage.coffee.png" in out.stdout
