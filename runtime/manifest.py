"""The bundle manifest: the contract between the workstation and the device.

Typed dataclasses, converted from the JSON dict once, here, with every field
checked; the rest of the runtime only sees these objects.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemm.runtime.errors import BundleError

SCHEMA_VERSION = 2  # the newest manifest schema this runtime understands
# 2: image.resize, text.padding, scoring "sigmoid" with logit_bias, precision "int8"/"fp16" bundles
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str  # graph input/output name
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: list[int | str]  # ints are fixed, strings name dynamic axes ("batch", "seq")


@dataclass(frozen=True)
class GraphSpec:
    file: str  # ONNX file, relative to the bundle directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class ImagePreprocess:
    size: int  # square side fed to the image graph
    crop_fraction: float  # centre square kept before resizing, as a fraction of the short side
    mean: list[float]  # per channel, subtracted from 0..255 RGB values
    std: list[float]  # per channel, divides after the mean
    color: str = "RGB"  # channel order the graph expects
    interpolation: str = "bilinear-antialias"  # resampling the reference pipeline uses
    resize: str = "crop"  # "crop": centre square, then resize; "squash": the whole image resized to a square


@dataclass(frozen=True)
class TextPreprocess:
    tokenizer: str  # tokenizer.json (Hugging Face `tokenizers` format), relative to the bundle
    max_length: int  # longer texts are truncated to this many tokens
    pad_id: int  # id used for padding; the attention mask marks real tokens
    padding: str = "longest"  # "longest": pad a batch to its longest text; "max_length": always to max_length


@dataclass(frozen=True)
class AudioPreprocess:
    sample_rate: int  # Hz the audio graph expects
    min_samples: int  # the audio graph's shortest input
    clip_samples: int  # shorter audio is tiled to this many samples (the model's own preprocessing)


@dataclass(frozen=True)
class Scoring:
    """How classify() turns image outputs and label texts into label scores."""

    kind: str  # "cosine": softmax(logit_scale * cos); "sigmoid": sigmoid(logit_scale * cos + logit_bias);
    #            "class_space": label weights over a fixed class set
    logit_scale: float = 100.0  # for "cosine" and "sigmoid"
    logit_bias: float = 0.0  # for "sigmoid"
    class_embeddings: str | None = None  # for "class_space": .npy (classes, dim) of unit vectors
    class_output: str | None = None  # for "class_space": image-graph output with class probabilities
    tau: float = 0.05  # for "class_space": temperature of the label → class softmax
    audio_output: str | None = None  # audio-visual: audio-graph output with probabilities over the same classes
    audio_weight: float = 0.5  # audio-visual: default weight of the audio in the late fusion (video: 1 - this)
    video_pooling: str = "mean"  # audio-visual: how frames' class probabilities pool over time ("mean", "attention")
    scene_output: str | None = None  # audio-visual: audio-graph output with scene probabilities (reported, not fused)
    scene_labels: str | None = None  # audio-visual: JSON list naming the scene output's classes


@dataclass(frozen=True)
class Fusion:
    """How a fusion bundle feeds its ``fusion`` graph and reads its logits."""

    task: str  # "matching": one logit, does the text describe the image; "classification": logits over `labels`
    architecture: str  # "early", "late", "gated" or "cross_attention" (what the graph holds)
    inputs: dict[str, str]  # fusion-graph input → "<graph role>/<output name>", or "tokens/attention_mask"
    labels: str | None = None  # classification: JSON list of the class names, in logit order
    threshold: float = 0.5  # matching: probability from which a pair counts as a match (picked on validation)
    rerank_cosine_weight: float = 0.0  # matching: a reranker scores head logit + this × the search's cosine (0: p)


@dataclass(frozen=True)
class Labels:
    file: str  # JSON list of default label names, relative to the bundle
    prompt: str = "{}"  # template a label is put in before embedding


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    name: str  # bundle name, e.g. "default"
    family: str  # model family, e.g. "dual_encoder"
    embedding_dim: int  # size of every embedding output
    precision: str  # "fp32", "fp16", "int8"
    graphs: dict[str, GraphSpec]  # role ("image_encoder", "text_encoder", …) → graph
    image: ImagePreprocess | None
    text: TextPreprocess | None
    scoring: Scoring
    labels: Labels | None
    files: dict[str, str]  # every file of the bundle (but the manifest) → sha256 hex digest
    verification: dict[str, Any] = field(default_factory=dict)  # graph → figures measured at export
    audio: AudioPreprocess | None = None  # audio-visual bundles
    fusion: Fusion | None = None  # fusion bundles
    source: dict[str, Any] = field(default_factory=dict)  # what the model was built from
    tools: dict[str, str] = field(default_factory=dict)  # package → version that made the bundle
    created: str = ""  # ISO 8601 UTC time of export

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def distilled_towers(self) -> list[str]:
        """The towers ("text", "image") replaced by distilled students, latest first (``source.distilled_from``)."""
        towers, entry = [], self.source.get("distilled_from")
        while entry:
            towers.append(entry["tower"])
            entry = entry.get("earlier")
        return towers

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Build a manifest from its JSON form, checking schema and fields.

        Raises:
            BundleError: The schema is newer than this runtime, or a field is missing or malformed.
        """
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise BundleError(f"{where}: 'schema_version' is missing or not an integer; this is not an edgemm bundle.")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{where}: bundle schema version {version} is newer than this edgemm understands "
                f"(up to {SCHEMA_VERSION}). Upgrade edgemm on this device, or re-export the bundle with this version."
            )
        try:
            graphs = {
                role: GraphSpec(
                    file=g["file"],
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                )
                for role, g in data["graphs"].items()
            }
            return cls(
                schema_version=version,
                name=str(data["name"]),
                family=str(data["family"]),
                embedding_dim=int(data["embedding_dim"]),
                precision=str(data["precision"]),
                graphs=graphs,
                image=ImagePreprocess(**data["image"]) if data.get("image") else None,
                text=TextPreprocess(**data["text"]) if data.get("text") else None,
                scoring=Scoring(**data["scoring"]),
                labels=Labels(**data["labels"]) if data.get("labels") else None,
                files=dict(data["files"]),
                verification=dict(data.get("verification", {})),
                audio=AudioPreprocess(**data["audio"]) if data.get("audio") else None,
                fusion=Fusion(**data["fusion"]) if data.get("fusion") else None,
                source=dict(data.get("source", {})),
                tools=dict(data.get("tools", {})),
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e}). Re-export the bundle.") from e


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and check ``manifest.json`` of a bundle directory.

    Raises:
        BundleError: The file is missing, not JSON, or not a manifest this runtime understands.
    """
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME}; this is not an edgemm bundle directory.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot be read as JSON ({e}). Re-export the bundle.") from e
    return Manifest.from_dict(data, where=str(path))
