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


def _system_python_with_gstreamer() -> str | None:
    """Debian's python3 when it has GStreamer's bindings and is this interpreter's version (so it can import the
    venv's packages); None otherwise."""
    import shutil

    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        return None
    probe = subprocess.run([python, "-c", "import sys, gi; gi.require_version('Gst', '1.0'); "
                            "print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
    return python if probe.stdout.strip() == "%d.%d" % sys.version_info[:2] else None


def test_gstreamer_appsink_reader_feeds_a_stream(default_bundle):
    import sysconfig

    import pytest

    python = _system_python_with_gstreamer()
    if python is None:
        pytest.skip("needs Debian's python3 with GStreamer bindings: apt-get install -y python3-gi "
                    "gstreamer1.0-plugins-base")
    code = f"""
import site, sys
site.addsitedir({sysconfig.get_paths()['purelib']!r})
sys.path.insert(0, {str(EXAMPLES)!r})
import numpy as np
from gstreamer_appsink import AppsinkReader
# A pure red 322x241 test picture (odd width: GStreamer pads BGR rows to 4 bytes).
reader = AppsinkReader("videotestsrc num-buffers=3 pattern=solid-color foreground-color=0xffff0000 ! "
                       "video/x-raw,width=322,height=241")
ok, frame = reader.read()
print("FRAME", ok, frame.shape, frame.dtype, frame.reshape(-1, 3).min(0).tolist(), frame.reshape(-1, 3).max(0).tolist())
reader.release()
sys.argv = ["x", "videotestsrc num-buffers=30 ! video/x-raw,width=320,height=240,framerate=30/1",
            "--bundle", {str(default_bundle)!r}, "--max-frames", "4"]
import runpy
runpy.run_path({str(EXAMPLES / "gstreamer_appsink.py")!r}, run_name="__main__")
"""
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "FRAME True (241, 322, 3) uint8 [0, 0, 255] [0, 0, 255]"
    frames = [line for line in lines[1:] if line.startswith("#")]
    assert len(frames) == 4 and all(" 320x240: " in line for line in frames), out.stdout
