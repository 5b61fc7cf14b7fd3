"""SoundNet-8 rebuilt from the packaged weights: export, verification, and what it hears in real recordings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemm.export.models import soundnet
from edgemm.export.models.dual_encoder import imagenet_class_names
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.runtime.audio import AudioPreprocessor
from edgemm.runtime.manifest import AudioPreprocess
from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend

ALSA = Path("/usr/share/sounds/alsa")
pytestmark = pytest.mark.skipif(not (ALSA / "Noise.wav").is_file(), reason="apt-get install alsa-utils")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    model = soundnet.soundnet8()
    path = export_onnx(model, soundnet.AUDIO_ENCODER, tmp_path_factory.mktemp("audio") / "audio_encoder.onnx")
    return model, path


@pytest.fixture(scope="module")
def pre():
    rate = soundnet.SAMPLE_RATE
    return AudioPreprocessor(AudioPreprocess(rate, soundnet.min_samples(), rate * soundnet.CLIP_SECONDS))


def test_length_arithmetic():
    n = soundnet.min_samples()
    assert soundnet.time_steps(n) == 1 and soundnet.time_steps(n - 1) == 0
    assert soundnet.time_steps(soundnet.SAMPLE_RATE * soundnet.CLIP_SECONDS) == 4


def test_export_matches_pytorch_on_real_recordings_of_any_length(graph, pre):
    model, path = graph
    noise, speech = pre(ALSA / "Noise.wav"), pre(ALSA / "Front_Center.wav")
    longer = np.concatenate([noise, noise[:, : soundnet.SAMPLE_RATE * 7]], axis=1)  # the samples axis is dynamic
    report = verify_onnx(model, soundnet.AUDIO_ENCODER, path,
                         [{"waveform": noise}, {"waveform": np.concatenate([noise, speech])}, {"waveform": longer}],
                         description="ALSA test recordings")
    assert report["passed"] and max(report["max_abs_diff"].values()) < 1e-5


def _top(probs, names, k=3):
    return [names[i] for i in np.argsort(-probs)[:k]]


def test_what_it_hears_golden(graph, pre):
    """Pinned top classes on real recordings (seen when the tower was rebuilt; the paper's model agrees
    that white noise sounds like the sea)."""
    backend = OnnxRuntimeBackend(graph[1], threads=1)
    objects, places = imagenet_class_names(), soundnet.place_names()
    noise = backend.infer({"waveform": pre(ALSA / "Noise.wav")})
    assert _top(noise["place_probs"][0], places) == ["ocean", "wave", "coast"]
    assert _top(noise["object_probs"][0], objects)[0] == "beach"
    voice = backend.infer({"waveform": pre(ALSA / "Front_Center.wav")})
    assert _top(voice["place_probs"][0], places)[0] == "server_room"
    assert _top(voice["object_probs"][0], objects)[0] == "website"
    assert np.allclose(noise["object_probs"].sum(), 1, atol=1e-4) and np.allclose(noise["place_probs"].sum(), 1, atol=1e-4)

