"""Audio front end without torch: WAV files and numpy arrays → the audio graph's mono waveform.

Any sample rate is resampled to the model's with a polyphase windowed-sinc
filter (Kaiser window, the same design as ``scipy.signal.resample_poly``);
channels are mixed to mono; integer samples are scaled to [-1, 1]. Clips
shorter than the model's clip length are tiled to it, as the model's own
preprocessing does.
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import InputError
from edgemm.runtime.manifest import AudioPreprocess

MAX_CHANNELS = 8  # more than this on the second axis means the array is (channels, samples)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file → (float32 samples (n, channels) in [-1, 1], sample rate).

    Reads PCM (8, 16, 24, 32 bit) and IEEE float (32, 64 bit), plain or
    WAVE_FORMAT_EXTENSIBLE.

    Raises:
        InputError: Missing file, not a RIFF/WAVE file, or an encoding it does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file '{path}' does not exist.")
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(f"'{path}' is not a WAV (RIFF/WAVE) file; convert it first, e.g. sox in.ogg out.wav.")
    fmt = body = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunk = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise InputError(f"'{path}': WAV file without a fmt or data chunk.")
    tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the plain tag
    if channels < 1 or rate < 1 or align != channels * ((bits + 7) // 8):
        raise InputError(f"'{path}': inconsistent WAV header ({channels} channels, {rate} Hz, {bits} bit).")
    frames = len(body) // align
    raw = body[: frames * align]
    if tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits in (16, 32):
        x = np.frombuffer(raw, f"<i{bits // 8}").astype(np.float32) / float(2 ** (bits - 1))
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        raise InputError(f"'{path}': WAV encoding (format {tag}, {bits} bit) is not read; use PCM or float.")
    return x.reshape(frames, channels), int(rate)


def to_mono(audio: Any, *, where: str = "audio") -> np.ndarray:
    """A numpy array (samples,) or (samples, channels) → float32 mono in [-1, 1].

    Raises:
        InputError: Not an array, empty, channel-first layout, unsupported dtype, NaN or infinity.
    """
    if not isinstance(audio, np.ndarray):
        raise InputError(f"{where}: expected a numpy array or a WAV file path, got {type(audio).__name__}.")
    if audio.ndim not in (1, 2):
        raise InputError(f"{where}: expected shape (samples,) or (samples, channels), got {audio.shape}.")
    if audio.ndim == 2 and audio.shape[1] > MAX_CHANNELS:
        hint = " It looks channel-first: pass audio.T." if audio.shape[0] <= MAX_CHANNELS else ""
        raise InputError(f"{where}: shape {audio.shape} has {audio.shape[1]} channels on the second axis; "
                         f"expected (samples, channels) with at most {MAX_CHANNELS} channels.{hint}")
    if audio.size == 0:
        raise InputError(f"{where}: the audio is empty (shape {audio.shape}).")
    if audio.dtype == np.int16:
        x = audio.astype(np.float32) / 32768.0
    elif audio.dtype == np.int32:
        x = audio.astype(np.float32) / 2147483648.0
    elif audio.dtype in (np.float32, np.float64):
        x = audio.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{where}: the audio contains NaN or infinite samples.")
    else:
        raise InputError(f"{where}: dtype {audio.dtype} is not audio; pass float32/float64 in [-1, 1] or int16/int32 PCM.")
    return x.mean(axis=1) if x.ndim == 2 else x


def _kaiser_lowpass(up: int, down: int, half_width: int = 10, beta: float = 5.0) -> np.ndarray:
    """The anti-aliasing filter of a rational resampler, at the up-sampled rate, with gain ``up``."""
    cutoff = 1.0 / max(up, down)
    n = 2 * half_width * max(up, down) + 1
    t = np.arange(n) - (n - 1) / 2
    return (up * cutoff * np.sinc(cutoff * t) * np.kaiser(n, beta)).astype(np.float64)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample mono float audio from ``rate`` to ``target`` Hz (polyphase FIR, zero-phase)."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    ratio = Fraction(target, rate)
    up, down = ratio.numerator, ratio.denominator
    h = _kaiser_lowpass(up, down)
    delay = (len(h) - 1) // 2
    n_out = -(-len(x) * up // down)
    # output j sits at up-sampled position j*down + delay; the taps that meet an input sample there:
    pos = np.arange(n_out, dtype=np.int64) * down + delay
    first = pos // up  # the newest input sample under the filter
    phase = pos - first * up
    out = np.zeros(n_out, np.float64)
    padded = np.concatenate([np.zeros(len(h) // up + 1), x.astype(np.float64), np.zeros(len(h) // up + 1)])
    offset = len(h) // up + 1
    for k in range(len(h) // up + 1):
        taps = phase + k * up
        valid = taps < len(h)
        out += np.where(valid, h[np.minimum(taps, len(h) - 1)], 0.0) * padded[first - k + offset]
    return out.astype(np.float32)


class AudioPreprocessor:
    """Audio → the audio graph's (1, samples) float32 input.

    Args:
        spec: Sample rate and lengths of the model.
    """

    def __init__(self, spec: AudioPreprocess):
        self.spec = spec

    def __call__(self, audio: Any, sample_rate: int | None = None, *, where: str = "audio") -> np.ndarray:
        """One clip (a WAV path, or an array with its ``sample_rate``) → (1, samples), tiled to the clip length.

        Raises:
            InputError: Unreadable or malformed audio, a missing sample rate, or too few samples to tile.
        """
        return self.tile(self.load(audio, sample_rate, where=where))

    def load(self, audio: Any, sample_rate: int | None = None, *, where: str = "audio") -> np.ndarray:
        """One clip → mono float32 (samples,) at the model's rate, as long as it was.

        Raises:
            InputError: Unreadable or malformed audio, a missing sample rate, or less than 0.1 s.
        """
        if isinstance(audio, (str, os.PathLike)):
            samples, rate = read_wav(audio)
            x = to_mono(samples, where=str(audio))
        else:
            if sample_rate is None:
                raise InputError(f"{where}: pass sample_rate= with a numpy array (e.g. 16000, 44100, 48000).")
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
                raise InputError(f"{where}: sample_rate must be an integer number of Hz ≥ 1000, got {sample_rate!r}.")
            x, rate = to_mono(audio, where=where), int(sample_rate)
        x = resample(x, rate, self.spec.sample_rate)
        if len(x) < self.spec.sample_rate // 10:
            raise InputError(f"{where}: {len(x) / self.spec.sample_rate * 1000:.0f} ms of audio is too short to "
                             "classify; give at least 0.1 s.")
        return x.astype(np.float32, copy=False)

    def tile(self, x: np.ndarray) -> np.ndarray:
        """Mono samples at the model's rate → (1, samples), repeated up to the clip length if shorter."""
        if len(x) < self.spec.clip_samples:
            x = np.tile(x, -(-self.spec.clip_samples // len(x)))[: self.spec.clip_samples]
        return x[None, :].astype(np.float32, copy=False)
