"""Run the edgemm command line in a child process, with this interpreter.

CI runs the suite as ``.venv/bin/python -m pytest`` without activating the venv, so the ``edgemm``
script is not on PATH there; ``python -m edgemm._cli`` is the same entry point either way.
"""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "edgemm._cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stderr
    return out
