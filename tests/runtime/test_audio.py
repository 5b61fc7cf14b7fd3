"""The torch-free audio front end: WAV reading, mono mixing, resampling, length and input checks."""

from __future__ import annotations

import struct
import wave

import numpy as np
import pytest

from edgemm.runtime.audio import AudioPreprocessor, read_wav, resample, to_mono
from edgemm.runtime.errors import InputError
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
