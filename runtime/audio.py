"""Audio front end without torch: WAV files and numpy arrays → the audio graph's mono waveform.

Any sample rate is resampled to the model's with a polyphase windowed-sinc
filter (Kaiser window, the same design as ``scipy.signal.resample_poly``);
channels are mixed to mono; integer samples are scaled to [-1, 1]. Clips
shorter than the model's clip length are tiled to it, as the model's own
preprocessing does.

Inputs are untrusted and bounded before anything is allocated: a sample rate
(a WAV header's or ``sample_rate=``) must lie in ``[edgemm.limits.min_sample_rate,
edgemm.limits.max_sample_rate]`` and a clip may last at most
``edgemm.limits.max_audio_seconds``; WAV chunk headers are walked by seeking, so
only the data chunk is read, and only as much of it as the file holds.

Float samples (arrays and float WAVs) follow one rule: NaN or infinity is an
error; a peak up to 1.0 passes unchanged; a peak up to 2.0 (overshoot from
resampling or mixing) is clipped to [-1, 1]; a larger peak is an error, since
such samples are almost always integer PCM stored as float, and classifying
them would give a confident answer on garbage.
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import InputError
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import AudioPreprocess

MAX_CHANNELS = 8  # more than this on the second axis of an array means it is (channels, samples)
FLOAT_OVERSHOOT = 2.0  # float peaks up to this are clipped to [-1, 1]; above it they are refused
_ENCODINGS = {(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64)}  # (format tag, bits) read_wav decodes
_MAX_CHUNKS = 4096  # chunk headers walked before giving up on finding fmt and data


def check_sample_rate(rate: Any, where: str = "audio") -> int:
    """A sample rate (Python or numpy integer) within the limits, as an int.

    Raises:
        InputError: Not an integer (bools and floats included), or outside
            ``[LIMITS.min_sample_rate, LIMITS.max_sample_rate]``.
    """
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)):
        raise InputError(f"{where}: sample_rate must be an integer number of Hz (e.g. 16000, 44100, 48000), "
                         f"got {rate!r}.")
    if rate < LIMITS.min_sample_rate or rate > LIMITS.max_sample_rate:
        field = "min_sample_rate" if rate < LIMITS.min_sample_rate else "max_sample_rate"
        raise InputError(f"{where}: a sample rate of {rate} Hz is outside {LIMITS.min_sample_rate}-"
                         f"{LIMITS.max_sample_rate} Hz; pass the rate the audio was recorded at, or "
                         f"{LIMITS.hint(field)}.")
    return int(rate)


def check_duration(frames: int, rate: int, where: str = "audio") -> None:
    """Refuse a clip longer than ``LIMITS.max_audio_seconds`` (``frames`` samples per channel at ``rate`` Hz)."""
    if frames / rate > LIMITS.max_audio_seconds:
        raise InputError(f"{where}: {frames / rate:.1f} s of audio is longer than the "
                         f"{LIMITS.max_audio_seconds:g} s limit; split it into clips, or "
                         f"{LIMITS.hint('max_audio_seconds')}.")


def _float_samples(x: np.ndarray, where: str) -> np.ndarray:
    """Float32 samples held to the float rule (module docstring); may clip ``x`` in place."""
    if x.size == 0:
        return x
    if not np.isfinite(x).all():
        raise InputError(f"{where}: the audio contains NaN or infinite samples.")
    peak = max(float(x.max()), -float(x.min()))
    if peak > FLOAT_OVERSHOOT:
        raise InputError(f"{where}: float samples peak at {peak:g}, but float audio lies in [-1, 1]; these look "
                         "like integer PCM stored as float: divide by 32768 (16 bit) or 2**31 (32 bit) first.")
    if peak > 1.0:
        np.clip(x, -1.0, 1.0, out=x)
    return x


def _read_chunks(f: Any, size: int) -> tuple[bytes | None, int, int]:
    """Walk the RIFF chunk headers by seeking → (fmt bytes, data offset, data bytes actually in the file).

    Chunk sizes are untrusted: only the fmt chunk's first 64 bytes are read, and a
    data chunk that claims more than the file holds is cut to what is there.
    """
    fmt, data_at, data_size, pos = None, -1, 0, 12
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > size or (fmt is not None and data_at >= 0):
            break
        f.seek(pos)
        cid, n = struct.unpack("<4sI", f.read(8))
        if cid == b"fmt ":
            fmt = f.read(min(n, 64))  # 16, 18 or 40 bytes in practice
        elif cid == b"data":
            data_at, data_size = pos + 8, min(n, size - pos - 8)
        pos += 8 + n + (n & 1)
    return fmt, data_at, data_size


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file → (float32 samples (n, channels) in [-1, 1], sample rate).

    Reads PCM (8, 16, 24, 32 bit) and IEEE float (32, 64 bit), plain or
    WAVE_FORMAT_EXTENSIBLE. The header is checked (channels, encoding, rate,
    duration) before the samples are read; a truncated data chunk gives the
    samples the file holds. Float samples follow the module's float rule.

    Raises:
        InputError: Missing or unreadable file, not a RIFF/WAVE file, an encoding it does not read, an
            inconsistent header, or a rate, channel count or duration beyond ``edgemm.limits``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file '{path}' does not exist.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise InputError(f"'{path}' is not a WAV (RIFF/WAVE) file; convert it first, e.g. sox in.ogg out.wav.")
            fmt, data_at, data_size = _read_chunks(f, size)
            if fmt is None or data_at < 0 or len(fmt) < 16:
                raise InputError(f"'{path}': WAV file without a fmt or data chunk.")
            tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", fmt[:16])
            if tag == 0xFFFE and len(fmt) >= 26:
                tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the plain tag
            if (tag, bits) not in _ENCODINGS:
                raise InputError(f"'{path}': WAV encoding (format {tag}, {bits} bit) is not read; use PCM or float.")
            if channels < 1 or align != channels * (bits // 8):
                raise InputError(f"'{path}': inconsistent WAV header ({channels} channels, {rate} Hz, {bits} bit).")
            if channels > LIMITS.max_audio_channels:
                raise InputError(f"'{path}': the WAV header declares {channels} channels, more than "
                                 f"{LIMITS.max_audio_channels}; {LIMITS.hint('max_audio_channels')}.")
            rate = check_sample_rate(rate, f"'{path}'")
            frames = data_size // align
            check_duration(frames, rate, f"'{path}'")
            f.seek(data_at)
            raw = f.read(frames * align)
    except OSError as e:
        raise InputError(f"audio file '{path}' could not be read ({e}).") from e
    frames = len(raw) // align  # the file may have shrunk since it was measured
    raw = raw[: frames * align]
    if tag == 3:
        x = _float_samples(np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32), f"'{path}'")
    elif bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits in (16, 32):
        x = np.frombuffer(raw, f"<i{bits // 8}").astype(np.float32) / float(2 ** (bits - 1))
    else:  # 24 bit
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    return x.reshape(frames, channels), rate


def to_mono(audio: Any, *, where: str = "audio", max_channels: int = MAX_CHANNELS) -> np.ndarray:
    """A numpy array (samples,) or (samples, channels) → float32 mono in [-1, 1].

    int16 and int32 PCM are scaled to [-1, 1]. Float samples: NaN or infinity is
    an error; a peak up to 1.0 passes unchanged; a peak up to 2.0 is clipped to
    [-1, 1]; a larger one is an error (integer PCM stored as float: divide by
    32768 or 2**31 first).

    Args:
        audio: The samples.
        where: How to name this audio in error messages.
        max_channels: Most channels the second axis may hold; more means the
            array is probably channel-first. WAV samples, whose layout is known,
            pass ``LIMITS.max_audio_channels``.

    Raises:
        InputError: Not an array, empty, channel-first layout, unsupported dtype, NaN or infinity, or float
            samples far outside [-1, 1].
    """
    if not isinstance(audio, np.ndarray):
        raise InputError(f"{where}: expected a numpy array or a WAV file path, got {type(audio).__name__}.")
    if audio.ndim not in (1, 2):
        raise InputError(f"{where}: expected shape (samples,) or (samples, channels), got {audio.shape}.")
    if audio.ndim == 2 and audio.shape[1] > max_channels:
        hint = " It looks channel-first: pass audio.T." if audio.shape[0] <= max_channels else ""
        raise InputError(f"{where}: shape {audio.shape} has {audio.shape[1]} channels on the second axis; "
                         f"expected (samples, channels) with at most {max_channels} channels.{hint}")
    if audio.size == 0:
        raise InputError(f"{where}: the audio is empty (shape {audio.shape}).")
    if audio.dtype == np.int16:
        x = audio.astype(np.float32) / 32768.0
    elif audio.dtype == np.int32:
        x = audio.astype(np.float32) / 2147483648.0
    elif audio.dtype in (np.float32, np.float64):
        x = _float_samples(audio.astype(np.float32), where)  # a copy, so clipping leaves the caller's array alone
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
            InputError: Unreadable or malformed audio, a missing or out-of-range sample rate, a clip too
                long (``edgemm.limits.max_audio_seconds``) or too short (0.1 s).
        """
        return self.tile(self.load(audio, sample_rate, where=where))

    def load(self, audio: Any, sample_rate: int | None = None, *, where: str = "audio") -> np.ndarray:
        """One clip → mono float32 (samples,) at the model's rate, as long as it was.

        Raises:
            InputError: Unreadable or malformed audio, a missing or out-of-range sample rate, more than
                ``edgemm.limits.max_audio_seconds``, or less than 0.1 s.
        """
        if isinstance(audio, (str, os.PathLike)):
            samples, rate = read_wav(audio)  # rate and duration checked from the header, before reading
            x = to_mono(samples, where=str(audio), max_channels=LIMITS.max_audio_channels)
        else:
            if sample_rate is None:
                raise InputError(f"{where}: pass sample_rate= with a numpy array (e.g. 16000, 44100, 48000).")
            rate = check_sample_rate(sample_rate, where)
            x = to_mono(audio, where=where)
            check_duration(len(x), rate, where)
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
