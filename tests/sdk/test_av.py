"""The audio-visual model on real frames and real recordings: fusion, missing modalities, streaming, fitting."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import edgemm
from clirun import run_cli
from sessions import spinning_entry
from edgemm.runtime.audio import read_wav

ALSA = Path("/usr/share/sounds/alsa")
NOISE, VOICE = ALSA / "Noise.wav", ALSA / "Front_Center.wav"
LABELS = ["the sea", "a cat", "a rocket", "a person speaking", "traffic", "music"]
pytestmark = pytest.mark.skipif(not NOISE.is_file(), reason="apt-get install alsa-utils")


@pytest.fixture(scope="module")
def frames(photos):
    by_name = {p.name.split(".")[-1]: p.image for p in photos}
    return by_name


def test_bundle_is_verified_and_loads_as_audio_visual(av_bundle, av_model):
    manifest = json.loads((av_bundle / "manifest.json").read_text())
    assert manifest["family"] == "audio_visual" and set(manifest["graphs"]) == {
        "image_encoder", "text_encoder", "audio_encoder"}
    report = manifest["verification"]["audio_encoder"]
    assert report["passed"] and "alsa" in report["inputs"] and max(report["max_abs_diff"].values()) < 1e-4
    assert manifest["audio"]["sample_rate"] == 22050
    assert isinstance(av_model, edgemm.AudioVisual) and av_model.audio_weight == 0.5
    # a clip runs the image graph, then the audio graph: no spinning threads in between (the default)
    assert [spinning_entry(b) for b in (av_model.image_backend, av_model.audio_backend)] == ["0", "0"]


def test_audio_only_hears_the_sea_in_noise_and_says_video_is_missing(av_model):
    r = av_model.classify_av(None, NOISE, LABELS, top_k=len(LABELS))
    assert r.modalities == ("audio",) and r.missing == ("video",) and r.audio_weight == 1.0 and r.frames == 0
    rank = [p.label for p in r.predictions]
    assert rank.index("the sea") < rank.index("a cat") and rank.index("the sea") <= 1
    assert [s.label for s in r.scenes] == ["ocean", "wave", "coast"]
    assert r.audio_seconds == pytest.approx(len(read_wav(NOISE)[0]) / 48000, rel=1e-3)


def test_frames_only_is_the_image_classifier_and_says_audio_is_missing(av_model, frames):
    cat = frames["chelsea"]
    r = av_model.classify_av([cat], None, LABELS, top_k=len(LABELS), color="rgb")
    assert r.modalities == ("video",) and r.missing == ("audio",) and r.audio_weight == 0.0 and r.label == "a cat"
    single = {p.label: p.score for p in av_model.classify(cat, LABELS, top_k=len(LABELS), color="rgb")}
    assert all(p.score == pytest.approx(single[p.label], abs=1e-6) for p in r.predictions)


def test_fusion_is_the_weighted_mix_of_the_two(av_model, frames):
    clip = [frames["chelsea"], frames["chelsea"][:, ::-1].copy()]

    def probs(r):
        return {p.label: p.score for p in r.predictions}

    k = len(LABELS)
    both = av_model.classify_av(clip, NOISE, LABELS, audio_weight=0.3, top_k=k, color="rgb")
    assert both.modalities == ("video", "audio") and both.missing == () and both.frames == 2
    assert probs(av_model.classify_av(clip, NOISE, LABELS, audio_weight=0.0, top_k=k, color="rgb")) == pytest.approx(
        probs(av_model.classify_av(clip, None, LABELS, top_k=k, color="rgb")))
    assert probs(av_model.classify_av(clip, NOISE, LABELS, audio_weight=1.0, top_k=k, color="rgb")) == pytest.approx(
        probs(av_model.classify_av(None, NOISE, LABELS, top_k=k)))
    # The sound of the sea pulls the fused label towards the sea compared with the frames alone.
    alone = probs(av_model.classify_av(clip, None, LABELS, top_k=k, color="rgb"))
    assert probs(both)["the sea"] > alone["the sea"] and probs(both)["a cat"] < alone["a cat"]


def test_attention_pooling_weighs_the_informative_frame_more(av_model, frames):
    blank = np.full_like(frames["chelsea"], 128)
    mean = av_model.classify_av([frames["chelsea"], blank], None, LABELS, pooling="mean", color="rgb")
    attn = av_model.classify_av([frames["chelsea"], blank], None, LABELS, pooling="attention", color="rgb")
    assert mean.frame_weights == (0.5, 0.5)
    assert attn.frame_weights[0] > attn.frame_weights[1] and sum(attn.frame_weights) == pytest.approx(1)


def test_array_audio_at_any_rate_and_layout_matches_the_file(av_model):
    samples, rate = read_wav(NOISE)
    from_file = av_model.classify_av(None, NOISE, LABELS).predictions
    stereo = np.repeat(samples, 2, axis=1)
    from_array = av_model.classify_av(None, stereo, LABELS, sample_rate=rate).predictions
    assert [p.label for p in from_array] == [p.label for p in from_file]
    assert [p.score for p in from_array] == pytest.approx([p.score for p in from_file], abs=1e-5)
    pcm16 = (samples[:, 0] * 32767).astype(np.int16)
    assert av_model.classify_av(None, pcm16, LABELS, sample_rate=rate).label == from_file[0].label


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=None, audio=None), "neither"),
    (dict(audio=np.zeros(0, np.float32), sample_rate=16000), "empty"),
    (dict(audio=np.zeros(800, np.float32), sample_rate=16000), "too short"),
    (dict(audio=np.full(16000, np.nan, np.float32), sample_rate=16000), "NaN"),
    (dict(audio=np.zeros((2, 16000), np.float32), sample_rate=16000), "channels"),
    (dict(audio=np.array(["a"] * 16000), sample_rate=16000), "dtype"),
    (dict(audio=np.zeros(16000, np.float32)), "sample_rate"),
    (dict(audio=NOISE, audio_weight=1.5), "audio_weight"),
    (dict(audio=NOISE, pooling="max"), "pooling"),
    (dict(audio="missing.wav"), "does not exist"),
])
def test_bad_audio_and_options_are_clear_errors(av_model, kwargs, message):
    with pytest.raises(edgemm.InputError, match=message):
        av_model.classify_av(labels=LABELS, **kwargs)


def test_bad_frames_are_clear_errors(av_model, frames):
    with pytest.raises(edgemm.InputError, match="share a size"):
        av_model.classify_av([frames["chelsea"], frames["rocket"]], None, LABELS)
    with pytest.raises(edgemm.InputError, match="empty"):
        av_model.classify_av([], NOISE, LABELS)
    with pytest.raises(edgemm.InputError, match="list of images"):
        av_model.classify_av(frames["chelsea"], NOISE, LABELS)


def test_stream_follows_the_scene_smoothly(av_model, frames):
    stream = av_model.stream(LABELS, window=1.0, smoothing=0.7, color="rgb")
    assert stream.result() is None
    for i in range(5):
        stream.add_frame(frames["chelsea"], timestamp=i * 0.25)
    assert stream.result().label == "a cat" and stream.result().frames == 5
    labels = []
    for i in range(5, 15):  # the camera now sees the rocket; frames older than the window leave it
        stream.add_frame(frames["rocket"], timestamp=i * 0.25)
        labels.append(stream.result().label)
    assert labels[0] == "a cat" and labels[-1] == "a rocket"  # smoothed: not flipped by the first new frame
    assert stream.result().frames == 5  # 1 s window at 4 frames/s, both ends included


def test_stream_takes_microphone_chunks_from_another_thread(av_model, frames):
    samples, rate = read_wav(NOISE)
    stream = av_model.stream(LABELS, window=2.0, audio_hop=0.5, smoothing=0.0, color="rgb")
    errors = []

    def microphone():
        try:
            for start in range(0, len(samples), 4800):
                stream.add_audio(samples[start : start + 4800], rate)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    mic = threading.Thread(target=microphone)
    mic.start()
    for i in range(4):
        stream.add_frame(frames["chelsea"], timestamp=i * 0.1)
    mic.join()
    assert not errors
    r = stream.result()
    assert r.modalities == ("video", "audio") and r.audio_seconds == pytest.approx(len(samples) / rate, rel=1e-3)
    with pytest.raises(edgemm.InputError, match="Hz"):
        stream.add_audio(samples[:4800], 16000)


def test_fit_learns_the_mix_from_labelled_clips_and_saves_it(av_model, frames, tmp_path):
    # The frames show a cat or a rocket; only the sound tells the sea from speech.
    labels = ["the sea", "a person speaking"]
    clips = [([frames["chelsea"]], NOISE, "the sea"), ([frames["rocket"]], VOICE, "a person speaking"),
             ([frames["rocket"]], NOISE, "the sea"), ([frames["chelsea"]], VOICE, "a person speaking")]
    fit = edgemm.fit_av_fusion(av_model, [(f, a, y) for f, a, y in clips], labels, steps=10)
    assert fit.accuracy == 1.0 and fit.audio_weight > 0 and fit.audio_only == 1.0 and fit.clips == 4
    saved = edgemm.save_av_fusion(av_model, fit, str(tmp_path / "fitted"))
    model = edgemm.load(saved.path, threads=1)
    assert model.audio_weight == fit.audio_weight and model.video_pooling == fit.pooling
    assert model.manifest.source["av_fusion_fit"]["accuracy"] == 1.0
    with pytest.raises(edgemm.InputError, match="not among the labels"):
        edgemm.fit_av_fusion(av_model, [*clips[:1], ([frames["chelsea"]], NOISE, "a dog")], labels)


def test_cli_classify_av(av_bundle, frames, tmp_path):
    from PIL import Image

    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(frames["chelsea"]).save(folder / f"{i:03d}.png")
    out = run_cli("classify-av", "--bundle", av_bundle, "--frames", folder, "--audio", NOISE,
                  "--labels", *LABELS, "--threads", "1", "--json")
    result = json.loads(out.stdout)
    assert result["modalities"] == ["video", "audio"] and result["frames"] == 3
    assert result["predictions"][0]["label"] in ("a cat", "the sea")
    bad = run_cli("classify-av", "--bundle", av_bundle, "--audio", folder / "000.png", check=False)
    assert bad.returncode == 2 and "not a WAV" in bad.stderr


def test_a_dual_encoder_bundle_is_not_audio_visual(default_bundle):
    out = run_cli("classify-av", "--bundle", default_bundle, "--audio", NOISE, check=False)
    assert out.returncode == 2 and "not audio-visual" in out.stderr


def test_cli_train_av_fits_labelled_clips_and_rejects_bad_rows(av_bundle, frames, tmp_path):
    from PIL import Image

    for name in ("chelsea", "rocket"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(frames[name]).save(tmp_path / name / f"{i:03d}.png")
    rows = ["frames,audio,label", f"chelsea,{NOISE},the sea", f"rocket,{VOICE},a person speaking",
            f"rocket,{NOISE},the sea", f"chelsea/000.png,{VOICE},a person speaking"]
    (tmp_path / "clips.csv").write_text("\n".join(rows) + "\n")
    out = run_cli("train", "av", tmp_path / "clips.csv", "--bundle", av_bundle, "--steps", "10", "--threads", "1",
                  "-o", tmp_path / "fitted", "--json")
    fit = json.loads(out.stdout)
    assert fit["clips"] == 4 and fit["accuracy"] == 1.0 and fit["audio_weight"] > 0
    model = edgemm.load(tmp_path / "fitted", threads=1)
    assert model.audio_weight == fit["audio_weight"] and model.manifest.source["av_fusion_fit"] == fit

    (tmp_path / "bad.csv").write_text("\n".join([*rows[:2], "rocket,missing.wav,the sea", "nowhere,,music"]) + "\n")
    bad = run_cli("train", "av", tmp_path / "bad.csv", "--bundle", av_bundle, "-o", tmp_path / "never", check=False)
    assert bad.returncode == 2 and "line 3: audio 'missing.wav'" in bad.stderr and "line 4: frames" in bad.stderr
    assert not (tmp_path / "never").exists()
