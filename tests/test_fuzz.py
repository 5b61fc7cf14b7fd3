"""Fuzzing what edgemm reads from disk: real manifests, index files, WAV and PNG files, mutated.

Every outcome must be success or an ``EdgemmError``, within a time bound per case and an address-space
limit on the process that opens the files (tests/fuzz_worker.py). Hypothesis draws the mutations: field
edits with hostile values, truncations, bit flips, forged sizes in headers. The fast suite runs a fixed
(derandomized) minute of cases; the slow step runs more, freshly random.
"""

from __future__ import annotations

import base64
import io
import json
import select
import struct
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgemm

MEMORY_LIMIT = 3 << 30  # address space of the worker: a case that tries to allocate more fails
CASE_SECONDS = 10  # the 1 Hz WAV of the issue took 31 s before it failed
WORKER = Path(__file__).with_name("fuzz_worker.py")


class Worker:
    """One long-lived worker process (importing onnxruntime per case would cost a second each)."""

    def __init__(self, bundle: Path, workdir: Path):
        self.bundle, self.workdir, self.proc, self.runs = bundle, workdir, None, 0

    def _start(self) -> None:
        self.runs += 1
        workdir = self.workdir / f"run{self.runs}"
        workdir.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(self.bundle), str(workdir), str(MEMORY_LIMIT), str(CASE_SECONDS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._read(120))["ready"]

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            code = self.proc.wait()
            self.proc = None
            raise AssertionError(f"the worker died or hung (exit code {code})")
        return line

    def check(self, kind: str, data: bytes) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps({"kind": kind, "data": base64.b64encode(data).decode()}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._read(CASE_SECONDS + 20))
        assert reply["outcome"] in ("ok", "edgemm"), f"{kind} case escaped: {reply['error']}"
        return reply

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(default_bundle, tmp_path_factory):
    w = Worker(default_bundle, tmp_path_factory.mktemp("fuzz"))
    yield w
    w.close()


# -- the real files mutated -----------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(default_bundle) -> dict:
    return json.loads((default_bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def index_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    index = edgemm.VectorIndex(16)
    index.add(rng.normal(size=(12, 16)).astype(np.float32), ids=[f"photo-{i}" for i in range(12)],
              metadata=[{"camera": i % 3, "tags": ["a", "b"]} for i in range(12)])
    path = tmp_path_factory.mktemp("index") / "index.npz"
    index.save(path)
    return path.read_bytes()


def _wav(rate: int = 16000, channels: int = 2, seconds: float = 0.3) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = (np.sin(2 * np.pi * 440 * t) * 20000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def _png(mode: str) -> bytes:
    from PIL import Image

    from edgemm.runtime.datasets import sample_photos

    photo = sample_photos()[0].image
    image = Image.fromarray(photo[:48, :64]).convert("L" if mode == "I;16" else "RGB")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- mutations --------------------------------------------------------------------------------

HOSTILE_NUMBERS = [0, -1, 1, 2, 3, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 10**12]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(HOSTILE_NUMBERS), st.integers(),
              st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from(["", "{}", "{}{}", "{0}", "../labels.json", "/etc/passwd", "manifest.json",
                               "image_encoder.onnx", "labels.json", "tokenizer.json", "a/../../b", "\\x00",
                               "embedding", "class_probs", "nope", "cosine", "sigmoid", "class_space"]),
              st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _leaf_paths(obj, prefix=()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += _leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += _leaf_paths(v, (*prefix, i))
    return paths


def _edit(obj, path: tuple, value, delete: bool):
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _byte_ops():
    """Truncations, bit flips and forged 32-bit fields, positions as fractions so they fit any file."""
    position = st.floats(0, 1, exclude_max=True)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("u32"), position, st.sampled_from(HOSTILE_NUMBERS[:12])),
        st.tuples(st.just("truncate"), position, st.just(0)),
    ), min_size=1, max_size=4)


def _mutate_bytes(data: bytes, ops, head: int | None = None) -> bytes:
    """Apply byte ops; ``head`` confines them to the first bytes (where headers live)."""
    b = bytearray(data)
    for op, where, value in ops:
        span = min(len(b), head or len(b))
        if span == 0:
            break
        at = int(where * span)
        if op == "flip":
            b[at] ^= 1 << value
        elif op == "u32":
            b[at : at + 4] = struct.pack("<I", value % 2**32)[: len(b) - at]
        else:
            del b[at:]
    return bytes(b)


FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _manifest_case(manifest: dict, edits, text_ops) -> bytes:
    data = json.loads(json.dumps(manifest))
    paths = _leaf_paths(data)
    for pick, value, delete in edits:
        path = paths[int(pick * len(paths))]
        try:
            _edit(data, path, value, delete)
        except (KeyError, IndexError, TypeError):  # an earlier edit replaced this path's parent
            pass
    text = json.dumps(data).encode()
    return _mutate_bytes(text, text_ops) if text_ops else text


MANIFEST_CASES = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), JSON_VALUES, st.booleans()), min_size=1, max_size=3),
    st.one_of(st.just([]), _byte_ops()))


def _index_case(original: bytes, kind: str, header_edits, shape, ops) -> bytes:
    """Byte ops on the file, or a rebuilt file whose JSON header or vectors' .npy header lies."""
    if kind == "bytes":
        return _mutate_bytes(original, ops)
    with zipfile.ZipFile(io.BytesIO(original)) as z:
        members = {name: z.read(name) for name in z.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in members.items():
            array = np.load(io.BytesIO(blob), allow_pickle=False)
            if name.startswith("header") and kind == "header":
                header = json.loads(array.tobytes())
                paths = _leaf_paths(header)
                for pick, value, delete in header_edits:
                    try:
                        _edit(header, paths[int(pick * len(paths))], value, delete)
                    except (KeyError, IndexError, TypeError):
                        pass
                array = np.frombuffer(json.dumps(header).encode(), np.uint8)
            buf = io.BytesIO()
            if name.startswith("vectors") and kind == "shape":
                meta = np.lib.format.header_data_from_array_1_0(array)
                meta["shape"] = shape
                np.lib.format.write_array_header_1_0(buf, meta)
                buf.write(array.tobytes())
            else:
                np.save(buf, array)
            z.writestr(name, buf.getvalue())
    return out.getvalue()


INDEX_CASES = st.tuples(
    st.sampled_from(["bytes", "header", "shape"]),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), JSON_VALUES, st.booleans()), min_size=1, max_size=3),
    st.tuples(st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_NUMBERS)),
    _byte_ops())


def _fuzz(worker, fast: bool, manifest, index_bytes):
    wav, pngs = _wav(), [_png("RGB"), _png("I;16")]
    chosen = FAST if fast else SLOW
    manifest_settings = settings(chosen, max_examples=chosen.max_examples // 2)

    @manifest_settings
    @given(MANIFEST_CASES)
    def manifests(case):
        worker.check("manifest", _manifest_case(manifest, *case))

    @chosen
    @given(INDEX_CASES)
    def indexes(case):
        worker.check("index", _index_case(index_bytes, *case))

    @chosen
    @given(_byte_ops(), st.booleans())
    def wavs(ops, header_only):
        worker.check("wav", _mutate_bytes(wav, ops, head=44 if header_only else None))

    @chosen
    @given(_byte_ops(), st.integers(0, 1), st.booleans())
    def images(ops, which, header_only):
        worker.check("png", _mutate_bytes(pngs[which], ops, head=33 if header_only else None))

    for run in (manifests, indexes, wavs, images):
        run()


def test_the_real_files_unmutated_load(worker, manifest, index_bytes):
    """The baseline: the same harness opens the originals successfully (so refusals below mean something)."""
    for kind, data in (("manifest", json.dumps(manifest).encode()), ("index", index_bytes), ("wav", _wav()),
                       ("png", _png("RGB")), ("png", _png("I;16"))):
        assert worker.check(kind, data)["outcome"] == "ok", kind


def test_fuzzed_files_succeed_or_raise_edgemm_errors(worker, manifest, index_bytes):
    _fuzz(worker, True, manifest, index_bytes)


@pytest.mark.slow
def test_fuzzed_files_succeed_or_raise_edgemm_errors_long_run(worker, manifest, index_bytes):
    _fuzz(worker, False, manifest, index_bytes)
