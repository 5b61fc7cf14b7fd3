"""The torch-free audio front end: WAV reading, mono mixing, resampling, length and input checks."""

from __future__ import annotations

import struct
import time
import tracemalloc
import wave

import numpy as np
import pytest

from edgemm.runtime.audio import AudioPreprocessor, read_wav, resample, to_mono
from edgemm.runtime.errors import InputError
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import AudioPreprocess

SPEC = AudioPreprocess(sample_rate=22050, min_samples=1000, clip_samples=22050 * 2)


def _pcm_wav(path, samples: np.ndarray, rate: int, width: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 2:
            w.writeframes((samples * 32767).astype("<i2").tobytes())
        else:  # 24 bit, little-endian three bytes
            v = (samples * (2**23 - 1)).astype(np.int32).reshape(-1)
            w.writeframes(np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], 1).astype(np.uint8).tobytes())


def _float_wav(path, samples: np.ndarray, rate: int) -> None:
    body = samples.astype("<f4").tobytes()
    channels = samples.shape[1]
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body)


def _chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
    return cid + struct.pack("<I", len(body) if size is None else size) + body + b"\0" * (len(body) & 1)


def _wav(fmt: tuple, body: bytes, *, data_size: int | None = None, before: bytes = b"", after: bytes = b"") -> bytes:
    """RIFF/WAVE bytes: fmt = (tag, channels, rate, byte rate, align, bits); chunks before and after data."""
    chunks = _chunk(b"fmt ", struct.pack("<HHIIHH", *fmt)) + before + _chunk(b"data", body, data_size) + after
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.fixture
def tone():
    t = np.arange(48000) / 48000
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 880 * t)
    return np.stack([left, right], 1).astype(np.float32) * 0.8


@pytest.mark.parametrize("kind", ["pcm16", "pcm24", "float32"])
def test_wav_encodings_read_back(tmp_path, tone, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "float32":
        _float_wav(path, tone, 48000)
    else:
        _pcm_wav(path, tone, 48000, 2 if kind == "pcm16" else 3)
    samples, rate = read_wav(path)
    assert rate == 48000 and samples.shape == tone.shape
    assert np.abs(samples - tone).max() < (1e-4 if kind == "pcm16" else 1e-6)


def test_resampling_matches_scipy_and_removes_what_cannot_be_represented():
    from scipy.signal import resample_poly

    rng = np.random.default_rng(0)
    x = rng.standard_normal(48000).astype(np.float32) * 0.1
    ours = resample(x, 48000, 22050)
    ref = resample_poly(x, 147, 320)
    assert len(ours) == len(ref) and np.abs(ours - ref).max() < 1e-3
    t = np.arange(48000) / 48000
    above_nyquist = resample(np.sin(2 * np.pi * 15000 * t).astype(np.float32), 48000, 22050)
    assert np.sqrt(np.mean(above_nyquist[200:-200] ** 2)) < 0.01  # 15 kHz cannot exist at 22.05 kHz
    tone = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 48000, 22050)
    expected = np.sin(2 * np.pi * 1000 * np.arange(len(tone)) / 22050)
    assert np.abs(tone[200:-200] - expected[200:-200]).max() < 2e-3


def test_preprocessor_mixes_resamples_and_tiles(tmp_path, tone):
    pre = AudioPreprocessor(SPEC)
    out = pre(tone, 48000)
    assert out.shape == (1, SPEC.clip_samples) and out.dtype == np.float32
    mono = resample(tone.mean(1), 48000, 22050)
    assert np.allclose(out[0, : len(mono)], mono, atol=1e-6)
    assert np.allclose(out[0, len(mono) : 2 * len(mono)], mono, atol=1e-6)  # tiled, not zero-padded
    _pcm_wav(tmp_path / "a.wav", tone, 48000, 2)
    assert np.abs(pre(tmp_path / "a.wav") - out).max() < 1e-3
    long = np.zeros((48000 * 3, 1), np.float32)
    assert pre(long, 48000).shape == (1, 22050 * 3)  # longer audio is kept whole
    pcm = (tone * 32767).astype(np.int16)
    assert np.abs(pre(pcm, 48000) - out).max() < 1e-3


@pytest.mark.parametrize("audio, rate, message", [
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.zeros((2, 16000), np.float32), 16000, "channel-first: pass audio.T"),
    (np.array([0.0, np.nan] * 8000, np.float32), 16000, "NaN"),
    (np.zeros(16000, np.uint8), 16000, "dtype uint8"),
    (np.zeros(16000, np.float32), None, "pass sample_rate="),
    (np.zeros(16000, np.float32), 44.1, "sample_rate must be an integer"),
    (np.zeros(800, np.float32), 16000, "too short"),
    ([0.0] * 16000, 16000, "expected a numpy array"),
])
def test_bad_audio_is_a_clear_error(audio, rate, message):
    with pytest.raises(InputError, match=message):
        AudioPreprocessor(SPEC)(audio, rate)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_wav(tmp_path / "none.wav")
    (tmp_path / "x.wav").write_bytes(b"OggS" + b"\0" * 40)
    with pytest.raises(InputError, match="not a WAV"):
        read_wav(tmp_path / "x.wav")
    assert to_mono(np.ones((10, 2), np.float32)).shape == (10,)


@pytest.mark.parametrize("rate", [1, 999, 384_001, 4_294_967_295])
def test_wav_sample_rate_outside_the_limits_is_refused_before_reading(tmp_path, rate):
    path = tmp_path / "odd.wav"
    path.write_bytes(_wav((1, 1, rate, 2 * rate & 0xFFFFFFFF, 2, 16), b"\0\1" * 20_000))  # 40 KB of samples
    start = time.perf_counter()
    with pytest.raises(InputError, match=f"{rate} Hz is outside 1000-384000 Hz.*edgemm.limits.m.._sample_rate"):
        read_wav(path)
    with pytest.raises(InputError, match="is outside"):
        AudioPreprocessor(SPEC)(path)  # the 1 Hz file used to resample for 31 s, then raise MemoryError
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("rate", [10**12, 999, 384_001, np.int64(10**12), np.uint32(0)])
def test_array_sample_rate_outside_the_limits_is_refused(rate):
    with pytest.raises(InputError, match="is outside 1000-384000 Hz"):
        AudioPreprocessor(SPEC)(np.zeros(16000, np.float32), rate)  # 10**12 Hz used to ask for 2.9 TiB


@pytest.mark.parametrize("rate", [True, np.bool_(True), 44100.0, "44100", np.float32(44100)])
def test_sample_rate_must_be_an_integer(rate):
    with pytest.raises(InputError, match="sample_rate must be an integer number of Hz"):
        AudioPreprocessor(SPEC)(np.zeros(16000, np.float32), rate)


def test_sample_rate_limits_are_read_at_call_time(monkeypatch, tmp_path):
    pre = AudioPreprocessor(SPEC)
    assert pre(np.zeros(16000, np.float32), np.int64(16000)).shape == (1, SPEC.clip_samples)  # numpy ints work
    monkeypatch.setattr(LIMITS, "min_sample_rate", 500)
    assert pre(np.zeros(500, np.float32), np.uint16(500)).shape == (1, SPEC.clip_samples)  # 1 s at 500 Hz
    path = tmp_path / "low.wav"
    path.write_bytes(_wav((1, 1, 500, 1000, 2, 16), b"\0\0" * 500))
    assert read_wav(path)[1] == 500
    monkeypatch.setattr(LIMITS, "max_sample_rate", 8000)
    with pytest.raises(InputError, match="edgemm.limits.max_sample_rate"):
        pre(np.zeros(16000, np.float32), 16000)


def test_wav_duration_is_bounded_from_the_header(monkeypatch, tmp_path, tone):
    path = tmp_path / "one-second.wav"
    _pcm_wav(path, tone, 48000, 2)
    monkeypatch.setattr(LIMITS, "max_audio_seconds", 0.5)
    with pytest.raises(InputError, match=r"1.0 s of audio is longer than the 0.5 s limit.*max_audio_seconds"):
        read_wav(path)
    with pytest.raises(InputError, match="max_audio_seconds"):
        AudioPreprocessor(SPEC)(tone, 48000)  # arrays likewise, before resampling
    monkeypatch.setattr(LIMITS, "max_audio_seconds", 1.0)
    assert read_wav(path)[0].shape == tone.shape and AudioPreprocessor(SPEC)(tone, 48000).shape[0] == 1


def test_wav_chunks_are_walked_by_seeking_not_read(tmp_path, tone):
    """A 200 MB (sparse) trailing chunk and a 4 GB data size claim: only the samples are read."""
    pcm = (tone * 32767).astype("<i2")
    path = tmp_path / "big.wav"
    path.write_bytes(_wav((1, 2, 48000, 192000, 4, 16), pcm.tobytes(), before=_chunk(b"LIST", b"INFOabc"),
                          after=_chunk(b"junk", b"", size=200 << 20)))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + (200 << 20))  # a hole: no disk used, but read_bytes() would read it
    tracemalloc.start()
    try:
        samples, rate = read_wav(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rate == 48000 and np.array_equal(samples, pcm / np.float32(32768))
    assert peak < 4 * samples.nbytes, peak  # was the whole 200 MB file and more
    truncated = tmp_path / "truncated.wav"  # a recorder that died before writing the sizes back
    truncated.write_bytes(_wav((1, 2, 48000, 192000, 4, 16), pcm.tobytes() + b"\1", data_size=0xFFFFFFFF))
    assert np.array_equal(read_wav(truncated)[0], samples)
    huge_fmt = tmp_path / "huge-fmt.wav"
    huge_fmt.write_bytes(b"RIFF\xff\xff\xff\xffWAVEfmt \xff\xff\xff\xff" + b"\0" * 64)
    with pytest.raises(InputError, match="without a fmt or data chunk"):
        read_wav(huge_fmt)


@pytest.mark.parametrize("fmt, message", [
    ((1, 0, 48000, 0, 0, 16), "inconsistent WAV header"),
    ((1, 2, 48000, 192000, 2, 16), "inconsistent WAV header"),  # align says one channel
    ((1, 33, 48000, 0, 66, 16), "declares 33 channels, more than 32.*max_audio_channels"),
    ((1, 1, 48000, 0, 2, 12), "format 1, 12 bit"),
    ((2, 1, 48000, 0, 2, 16), "format 2, 16 bit"),  # ADPCM
    ((3, 1, 48000, 0, 2, 16), "format 3, 16 bit"),  # there is no 16-bit IEEE float
])
def test_bad_wav_headers(tmp_path, fmt, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(_wav(fmt, b"\0" * 4000))
    with pytest.raises(InputError, match=message):
        read_wav(path)


def test_wav_with_many_channels_mixes_to_mono(tmp_path):
    x = np.tile(np.linspace(-0.5, 0.5, 16000, dtype=np.float32)[:, None], (1, 16))
    path = tmp_path / "sixteen.wav"
    _float_wav(path, x, 16000)
    out = AudioPreprocessor(SPEC).load(path)  # a WAV's layout is known: 16 channels are not "channel-first"
    assert np.allclose(out, resample(x[:, 0], 16000, 22050), atol=1e-6)


def test_float_audio_rule():
    x = np.sin(np.linspace(0, 100, 16000)).astype(np.float32)
    assert np.array_equal(to_mono(x), x)  # peak 1.0: unchanged
    over = x * 1.5
    out = to_mono(over)
    assert np.array_equal(out, np.clip(over, -1, 1)) and over.max() == pytest.approx(1.5)  # clipped, a copy
    with pytest.raises(InputError, match="integer PCM stored as float: divide by 32768"):
        to_mono(x.astype(np.float64) * 20000)
    with pytest.raises(InputError, match="peak at 2.5"):
        AudioPreprocessor(SPEC)(x * 2.5, 16000)


def test_float_wav_follows_the_float_rule(tmp_path):
    x = np.sin(np.linspace(0, 100, 16000)).astype(np.float32)[:, None]
    path = tmp_path / "pcm-as-float.wav"
    _float_wav(path, x * 32767, 16000)
    with pytest.raises(InputError, match="pcm-as-float.wav.*divide by 32768"):
        read_wav(path)
    with pytest.raises(InputError, match="divide by 32768"):
        AudioPreprocessor(SPEC)(path)
    _float_wav(path, x * 1.2, 16000)
    assert np.array_equal(read_wav(path)[0], np.clip(x * 1.2, -1, 1))
    _float_wav(path, np.full((16000, 1), np.nan, np.float32), 16000)
    with pytest.raises(InputError, match="NaN"):
        read_wav(path)
