"""The fuzz test's worker: opens hostile files under an address-space limit, one case per line of stdin.

Run by tests/test_fuzz.py as ``python fuzz_worker.py BUNDLE WORKDIR MEMORY_BYTES SECONDS``. Each stdin line is
JSON ``{"kind": ..., "data": <base64>}``; each reply line is JSON ``{"outcome": "ok" | "edgemm" | "other" |
"timeout", "error": ..., "seconds": ...}``. Only "ok" and "edgemm" (an ``EdgemmError``) are acceptable.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np


class CaseTimeout(BaseException):
    """Raised by the alarm: a case ran past its time bound (BaseException, so no handler in edgemm swallows it)."""


def _alarm(signum, frame):
    raise CaseTimeout


def main() -> None:
    bundle, workdir, memory, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import edgemm
    from edgemm.runtime.audio import AudioPreprocessor
    from edgemm.runtime.image import to_rgb
    from edgemm.runtime.manifest import AudioPreprocess

    # The case's bundle: hard links to the real files (same bytes, same hashes), its own manifest per case.
    target = workdir / "bundle"
    target.mkdir()
    for f in bundle.iterdir():
        if f.name != "manifest.json":
            os.link(f, target / f.name)
    audio = AudioPreprocessor(AudioPreprocess(sample_rate=22050, min_samples=1, clip_samples=22050))

    def run(kind: str, data: bytes) -> None:
        if kind == "manifest":
            (target / "manifest.json").write_bytes(data)
            model = edgemm.load(target, threads=1)
            model.classify(np.zeros((32, 32, 3), np.uint8), top_k=1)
        elif kind == "index":
            (workdir / "index.npz").write_bytes(data)
            index = edgemm.VectorIndex.load(workdir / "index.npz")
            if len(index):
                index.search(np.ones(index.dim, np.float32), k=3)
        elif kind == "wav":
            (workdir / "sound.wav").write_bytes(data)
            audio(workdir / "sound.wav")
        elif kind == "png":
            (workdir / "image.png").write_bytes(data)
            to_rgb(workdir / "image.png")
        else:
            raise ValueError(kind)

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGALRM, _alarm)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        start = time.perf_counter()
        reply = {"outcome": "ok", "error": ""}
        signal.alarm(seconds)
        try:
            run(case["kind"], base64.b64decode(case["data"]))
        except CaseTimeout:
            reply = {"outcome": "timeout", "error": f"ran past {seconds} s"}
        except edgemm.EdgemmError as e:
            reply = {"outcome": "edgemm", "error": f"{type(e).__name__}: {e}"[:300]}
        except BaseException as e:  # noqa: BLE001 - the point is to report whatever escapes
            reply = {"outcome": "other", "error": "".join(traceback.format_exception(e))[-3000:]}
        finally:
            signal.alarm(0)
        reply["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
