"""Users' own CLIP and SigLIP checkpoints: a local Hugging Face folder → a dual-encoder bundle.

Each tower is exported *with* its projection and L2 normalisation, so a graph's
output is the embedding the runtime compares; the model's logit scale (and
SigLIP's logit bias) go into the manifest's scoring. Preprocessing is read from
the folder's ``preprocessor_config.json`` and the tokenizer is saved as the
``tokenizer.json`` the runtime reads; both are checked at export against the
folder's own Hugging Face processor, as the graphs are checked against PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.models.dual_encoder import FAMILY, imagenet_class_names
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.export.specs import ExportSpec
from edgemm.runtime.datasets import SAMPLE_SENTENCES, sample_photos
from edgemm.runtime.errors import ExportError
from edgemm.runtime.image import ImagePreprocessor
from edgemm.runtime.manifest import ImagePreprocess, Manifest, TensorSpec
from edgemm.runtime.text import TextTokenizer

DEFAULT_PROMPT = "a photo of a {}."  # CLIP's own zero-shot template


@dataclass(frozen=True)
class Architecture:
    """What differs between the supported checkpoint families."""

    model_class: str  # transformers class name
    scoring: str  # manifest scoring kind
    padding: str  # "longest" (attention mask) or "max_length" (the model was trained on fixed-length text)
    text_inputs: tuple[str, ...]  # what the text graph takes


ARCHITECTURES = {
    "clip": Architecture("CLIPModel", scoring="cosine", padding="longest",
                         text_inputs=("input_ids", "attention_mask")),
    "siglip": Architecture("SiglipModel", scoring="sigmoid", padding="max_length", text_inputs=("input_ids",)),
}

# resample codes of PIL / transformers image processors
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ImageTower(nn.Module):
    """pixels → unit image embedding (vision transformer, projection, normalisation)."""

    def __init__(self, model: nn.Module, model_type: str):
        super().__init__()
        self.vision = model.vision_model
        self.projection = model.visual_projection if model_type == "clip" else nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=pixels).pooler_output
        return F.normalize(self.projection(pooled), dim=-1)


class TextTower(nn.Module):
    """token ids (and mask) → unit text embedding."""

    def __init__(self, model: nn.Module, model_type: str):
        super().__init__()
        self.text = model.text_model
        self.projection = model.text_projection if model_type == "clip" else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.projection(pooled), dim=-1)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: the {what} cannot be read as JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path}: the {what} is not a JSON object.")
    return data


def read_folder_config(folder: str | Path) -> dict[str, Any]:
    """A local Hugging Face checkpoint folder's ``config.json``.

    Raises:
        ExportError: Not a directory, no config.json, or one that is not a JSON object.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"'{folder}' is not a directory; pass a local Hugging Face checkpoint folder "
                          "(the one save_pretrained() writes, with config.json).")
    config = folder / "config.json"
    if not config.is_file():
        raise ExportError(f"'{folder}' has no config.json, so it is not a Hugging Face checkpoint folder. "
                          "Save your model with model.save_pretrained(folder) (and its processor with "
                          "processor.save_pretrained(folder)).")
    return _read_json(config, "model config")


def check_weights(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ExportError(f"'{folder}' has a config.json but no weights (*.safetensors or *.bin).")


def read_processor_config(folder: Path) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no preprocessor_config.json; save the model's image processor "
                          "into it with processor.save_pretrained(folder).")
    return _read_json(path, "image processor config")


def checkpoint_type(folder: str | Path) -> str:
    """The model type of a local checkpoint folder ("clip" or "siglip").

    Raises:
        ExportError: Not a Hugging Face checkpoint folder, or an architecture edgemm cannot export.
    """
    folder = Path(folder)
    model_type = read_folder_config(folder).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"'{folder}' holds a {model_type!r} checkpoint; edgemm exports dual encoders of types "
                          f"{sorted(ARCHITECTURES)} (CLIPModel, SiglipModel).")
    check_weights(folder)
    return model_type


def load_folder_tokenizer(folder: Path, *, slow_ok: tuple[str, ...] = ()):
    """A checkpoint folder's tokenizer, which must have a fast `tokenizers` form (the runtime reads tokenizer.json)
    unless its class is in ``slow_ok`` (converted by the caller).

    Raises:
        ExportError: No tokenizer, or one without a fast form.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ExportError(f"'{folder}': no usable tokenizer ({type(e).__name__}: {e}). Save the model's "
                          "tokenizer into the folder with tokenizer.save_pretrained(folder).") from e
    if getattr(tok, "backend_tokenizer", None) is None and type(tok).__name__ not in slow_ok:
        raise ExportError(f"'{folder}': the tokenizer ({type(tok).__name__}) has no fast `tokenizers` form, "
                          "which the runtime reads. Save a fast tokenizer (tokenizer.json) into the folder.")
    return tok


def image_preprocess_from_processor(config: dict[str, Any], image_size: int) -> ImagePreprocess:
    """Map a Hugging Face image processor config to the manifest's preprocessing.

    CLIP-style processors resize the short side and centre-crop; SigLIP-style
    ones resize the whole image to a square ("squash").

    Raises:
        ExportError: A processor setting the runtime cannot reproduce.
    """
    def side(value: Any, key: str) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            if "shortest_edge" in value:
                return int(value["shortest_edge"])
            h, w = value.get("height"), value.get("width")
            if h is not None and h == w:
                return int(h)
            raise ExportError(f"preprocessor_config.json: {key} {value} is not square; edgemm feeds square images.")
        return None

    resize = side(config.get("size"), "size")
    crop = side(config.get("crop_size"), "crop_size") if config.get("do_center_crop", False) else None
    if resize is None:
        raise ExportError("preprocessor_config.json has no usable 'size'.")
    shortest = isinstance(config.get("size"), int) or "shortest_edge" in config.get("size", {})
    if crop is not None:
        if crop > resize:
            raise ExportError(f"preprocessor_config.json: crop_size {crop} is larger than the resize {resize}.")
        mode, size, fraction = "crop", crop, crop / resize
    elif shortest:
        mode, size, fraction = "crop", resize, 1.0  # short side to size, then the centre square
    else:
        mode, size, fraction = "squash", resize, 1.0
    if size != image_size:
        raise ExportError(f"preprocessor_config.json gives {size}x{size} images but the vision model takes "
                          f"{image_size}x{image_size}; the folder's processor and model do not belong together.")
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    mean = [float(m) for m in config.get("image_mean", [0.0] * 3)] if config.get("do_normalize", True) else [0.0] * 3
    std = [float(s) for s in config.get("image_std", [1.0] * 3)] if config.get("do_normalize", True) else [1.0] * 3
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ExportError(f"preprocessor_config.json: image_mean {mean} / image_std {std} are not 3 positive values.")
    # graph input = (x * rescale - mean) / std = (x - mean / rescale) / (std / rescale), with x in 0..255
    return ImagePreprocess(
        size=size, crop_fraction=fraction,
        mean=[m / rescale for m in mean], std=[s / rescale for s in std],
        color="RGB", interpolation=_RESAMPLE.get(int(config.get("resample", 3)), "bicubic"), resize=mode,
    )


def _specs(image_size: int, text_inputs: Sequence[str]) -> tuple[ExportSpec, ExportSpec]:
    image = ExportSpec(
        role="image_encoder", family=FAMILY,
        inputs=(TensorSpec("pixels", "float32", ["batch", 3, image_size, image_size]),),
        outputs=(TensorSpec("embedding", "float32", ["batch", "dim"]),),
        dummy_inputs=lambda: (torch.zeros(2, 3, image_size, image_size),),
        atol=1e-4,
    )
    text = ExportSpec(
        role="text_encoder", family=FAMILY,
        inputs=tuple(TensorSpec(name, "int64", ["batch", "seq"]) for name in text_inputs),
        outputs=(TensorSpec("embedding", "float32", ["batch", "dim"]),),
        dummy_inputs=lambda: tuple(torch.ones(2, 7, dtype=torch.long) for _ in text_inputs),
        atol=1e-4,
    )
    return image, text


class Checkpoint:
    """A loaded local CLIP/SigLIP folder: the PyTorch towers and its own processors.

    This is also the PyTorch reference that benchmarks and quantization reports
    compare against.

    Raises:
        ExportError: The folder is not a supported, complete checkpoint.
    """

    def __init__(self, folder: str | Path):
        import transformers

        self.folder = Path(folder).absolute()
        self.model_type = checkpoint_type(self.folder)
        self.arch = ARCHITECTURES[self.model_type]
        cls = getattr(transformers, self.arch.model_class)
        try:
            model = cls.from_pretrained(str(self.folder), local_files_only=True, attn_implementation="eager")
        except Exception as e:  # transformers raises many types for a broken folder
            raise ExportError(f"'{self.folder}': loading {self.arch.model_class} failed: {type(e).__name__}: {e}") from e
        self.model = model.eval()
        self.image_tower = ImageTower(model, self.model_type).eval()
        self.text_tower = TextTower(model, self.model_type).eval()
        self.image_size = int(model.config.vision_config.image_size)
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.logit_bias = float(model.logit_bias.detach()) if hasattr(model, "logit_bias") else 0.0
        self.embedding_dim = int(self.image_tower(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])
        self.tokenizer = load_folder_tokenizer(self.folder, slow_ok=("SiglipTokenizer",))
        self.processor_config = self._processor_config()
        self._processor = None  # the folder's Hugging Face image processor, loaded on first use
        self.image_spec = image_preprocess_from_processor(self.processor_config, self.image_size)
        positions = int(model.config.text_config.max_position_embeddings)
        limit = getattr(self.tokenizer, "model_max_length", positions) or positions
        self.max_length = min(positions, int(limit) if limit < 1_000_000 else positions)
        if self.tokenizer.pad_token_id is None:
            raise ExportError(f"'{self.folder}': the tokenizer has no pad token; set one and save it again.")
        self.pad_id = int(self.tokenizer.pad_token_id)

    def runtime_tokenizer(self):
        """The tokenizer as a `tokenizers.Tokenizer`, the form the runtime reads.

        SigLIP folders usually hold only a SentencePiece model; it is converted
        here, with SigLIP's text canonicalisation (lower case, punctuation
        removed, spaces collapsed) as normalizer steps. Export then checks the
        result gives the slow tokenizer's ids on real texts.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend
        return _convert_siglip_tokenizer(self.tokenizer)

    def _processor_config(self) -> dict[str, Any]:
        return read_processor_config(self.folder)

    def pixels(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """The folder's own Hugging Face image processor: the reference preprocessing."""
        from PIL import Image
        from transformers import AutoImageProcessor

        if self._processor is None:
            self._processor = AutoImageProcessor.from_pretrained(str(self.folder), local_files_only=True, backend="pil")
        out = self._processor(images=[Image.fromarray(im) for im in images_rgb], return_tensors="np")
        return out["pixel_values"].astype(np.float32)

    def feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The folder's own tokenizer: the reference tokenization."""
        batch = self.tokenizer(list(texts), padding=self.arch.padding, truncation=True,
                               max_length=self.max_length, return_tensors="np")
        out = {"input_ids": batch["input_ids"].astype(np.int64)}
        if "attention_mask" in self.arch.text_inputs:
            out["attention_mask"] = batch["attention_mask"].astype(np.int64)
        return out

    @torch.no_grad()
    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_tower(torch.from_numpy(pixels)).numpy()

    @torch.no_grad()
    def embed_texts(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.text_tower(*(torch.from_numpy(feeds[name]) for name in self.arch.text_inputs)).numpy()


def _convert_siglip_tokenizer(slow):
    import string

    from tokenizers import Regex, normalizers, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    class SiglipConverter(SpmConverter):
        handle_byte_fallback = True

        def post_processor(self):
            eos = (str(slow.eos_token), slow.convert_tokens_to_ids(str(slow.eos_token)))
            return processors.TemplateProcessing(single=["$A", eos[0]], pair=["$A", eos[0], "$B", eos[0]],
                                                 special_tokens=[eos])

    try:
        fast = SiglipConverter(slow).converted()
    except Exception as e:  # sentencepiece/protobuf missing or an unexpected model file
        raise ExportError(f"converting the SigLIP SentencePiece tokenizer failed ({type(e).__name__}: {e}); "
                          "install edgemm[export] (it brings sentencepiece and protobuf).") from e
    punctuation = "[" + "".join("\\" + c for c in string.punctuation) + "]"
    steps = [normalizers.Lowercase()] if getattr(slow, "do_lower_case", True) else []
    steps += [normalizers.Replace(Regex(punctuation), ""), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if fast.normalizer is not None:
        steps.append(fast.normalizer)
    fast.normalizer = normalizers.Sequence(steps)
    return fast


def _check_tokenizer(checkpoint: Checkpoint, path: Path, texts: Sequence[str]) -> dict[str, Any]:
    runtime = TextTokenizer(path, max_length=checkpoint.max_length, pad_id=checkpoint.pad_id,
                            padding=checkpoint.arch.padding)
    for text in texts:
        got = runtime([text])["input_ids"][0].tolist()
        want = checkpoint.feeds([text])["input_ids"][0].tolist()
        if got != want:
            raise ExportError(f"the saved tokenizer.json tokenizes {text!r} as {got[:16]}… but the folder's "
                              f"{type(checkpoint.tokenizer).__name__} gives {want[:16]}…; edgemm cannot "
                              "reproduce this tokenizer.")
    return {"texts": len(texts), "identical_ids": True}


def _check_preprocessing(checkpoint: Checkpoint, graph: Path, photos: Sequence[np.ndarray]) -> dict[str, Any]:
    from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(graph, providers=("cpu",))
    ours = backend.infer({"pixels": ImagePreprocessor(checkpoint.image_spec)(list(photos), color="rgb")})["embedding"]
    ref = backend.infer({"pixels": checkpoint.pixels(photos)})["embedding"]
    cos = (ours * ref).sum(1)
    return {"compared_to": "the folder's Hugging Face image processor", "images": len(photos),
            "embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min())}


def build_clip_bundle(folder: str | Path, out_dir: str | Path, *, name: str | None = None, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> Manifest:
    """Export a local CLIPModel / SiglipModel folder to a verified dual-encoder bundle.

    Args:
        folder: A Hugging Face checkpoint folder (config, weights, tokenizer, preprocessor config).
        out_dir: Bundle directory to create.
        name: Bundle name; the folder's name by default.
        overwrite: Replace an existing bundle.
        progress: Called with a short description before each step.

    Returns:
        The written manifest.

    Raises:
        ExportError: Not a supported checkpoint, an incomplete folder, or a failed export.
        VerificationError: An exported graph drifts from PyTorch.
    """
    step = progress or (lambda _msg: None)
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        step(f"loading {folder}")
        ckpt = Checkpoint(folder)
        image_spec, text_spec = _specs(ckpt.image_size, ckpt.arch.text_inputs)
        photos = [p.image for p in sample_photos()]
        sentences = list(SAMPLE_SENTENCES)
        labels = imagenet_class_names()
        prompts = [DEFAULT_PROMPT.format(label) for label in labels[:64]]

        step("exporting image_encoder.onnx")
        export_onnx(ckpt.image_tower, image_spec, w.path(image_spec.file))
        step("verifying image_encoder against PyTorch on sample photos")
        pixels = ckpt.pixels(photos)
        image_report = verify_onnx(ckpt.image_tower, image_spec, w.path(image_spec.file),
                                   [{"pixels": pixels[:1]}, {"pixels": pixels}], description="real sample photos")
        step("exporting text_encoder.onnx")
        export_onnx(ckpt.text_tower, text_spec, w.path(text_spec.file))
        step("verifying text_encoder against PyTorch on real sentences")
        text_report = verify_onnx(ckpt.text_tower, text_spec, w.path(text_spec.file),
                                  [ckpt.feeds(sentences[:1]), ckpt.feeds(sentences), ckpt.feeds(prompts)],
                                  description="real sentences and prompts")
        step("checking tokenizer and preprocessing against the folder's processors")
        ckpt.runtime_tokenizer().save(str(w.path("tokenizer.json")))
        odd = ["", "UPPER case!", "  spaced,   out!! ", "naïve café — 東京", " ".join(sentences)]
        tokenizer_report = _check_tokenizer(ckpt, w.path("tokenizer.json"), [*sentences, *prompts, *odd])
        preprocess_report = _check_preprocessing(ckpt, w.path(image_spec.file), photos)
        w.write_json("labels.json", list(dict.fromkeys(labels)))
        scoring: dict[str, Any] = {"kind": ckpt.arch.scoring, "logit_scale": ckpt.logit_scale}
        if ckpt.arch.scoring == "sigmoid":
            scoring["logit_bias"] = ckpt.logit_bias
        return w.commit(
            name=name or ckpt.folder.name,
            family=FAMILY,
            embedding_dim=ckpt.embedding_dim,
            precision="fp32",
            graphs={spec.role: spec.manifest_entry() for spec in (image_spec, text_spec)},
            image=vars(ckpt.image_spec),
            text={"tokenizer": "tokenizer.json", "max_length": ckpt.max_length, "pad_id": ckpt.pad_id,
                  "padding": ckpt.arch.padding},
            scoring=scoring,
            labels={"file": "labels.json", "prompt": DEFAULT_PROMPT},
            verification={"image_encoder": image_report, "text_encoder": text_report,
                          "tokenizer": tokenizer_report, "preprocessing": preprocess_report},
            source={"kind": "huggingface", "path": str(ckpt.folder), "model_type": ckpt.model_type,
                    "architecture": ckpt.arch.model_class},
        )
