"""How big an input edgemm accepts before reading it: one place, one object users can raise.

    >>> import edgemm
    >>> edgemm.limits.max_image_pixels = 200_000_000   # a 14k x 14k satellite tile
    >>> edgemm.limits.max_audio_seconds = 3600          # hour-long recordings

Every limit can also be set before start-up with an environment variable
(``EDGEMM_MAX_IMAGE_PIXELS`` …, the field name upper-cased), e.g. for a CLI run.
A file that asks for more than a limit is refused with an ``InputError`` (images,
sound, index files) or a ``BundleError`` (bundle files) naming the limit to raise,
before anything large is allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from edgemm.runtime.errors import InputError

ENV_PREFIX = "EDGEMM_"


@dataclass
class Limits:
    max_image_pixels: int = 89_478_485  # width x height of one image; Pillow's own default (a 0.25 GiB RGBA)
    min_sample_rate: int = 1_000  # Hz, for WAV headers and arrays alike
    max_sample_rate: int = 384_000  # Hz: the highest rate studio converters record at
    max_audio_seconds: float = 600.0  # one clip; longer recordings are split by the caller (or stream them)
    max_audio_channels: int = 32  # channels a WAV header may declare
    max_json_bytes: int = 64 << 20  # a manifest, labels or index header file
    max_tokenizer_bytes: int = 64 << 20  # tokenizer.json (SigLIP's is 2.4 MB, large multilingual ones 17 MB)
    max_index_bytes: int = 64 << 30  # vectors + ids an index file may declare once inflated
    max_dim: int = 65_536  # embedding width of an index

    def env_name(self, field: str) -> str:
        return ENV_PREFIX + field.upper()

    def hint(self, field: str) -> str:
        """How a user raises one limit, for error messages."""
        return f"raise edgemm.limits.{field} (or set {self.env_name(field)}) if this input is genuine"


def _from_environment() -> Limits:
    limits = Limits()
    for f in fields(Limits):
        raw = os.environ.get(limits.env_name(f.name))
        if raw is None:
            continue
        try:
            value = float(raw) if f.type == "float" else int(raw)
        except ValueError:
            raise InputError(f"{limits.env_name(f.name)}={raw!r} is not a number.") from None
        if not value > 0:
            raise InputError(f"{limits.env_name(f.name)}={raw!r} must be positive.")
        setattr(limits, f.name, value)
    return limits


LIMITS = _from_environment()  # the one instance every reader consults at call time (so changes apply at once)
