"""The fusion family: small heads over frozen image and text tower features.

Four architectures from the literature, registered by name in ``ARCHITECTURES``
and all exported under the one graph role ``"fusion"`` (a bundle holds one
fusion head), so the spec is built from the head's config by ``fusion_spec``
instead of being registered globally:

* ``early``: concatenate, then an MLP. When both embeddings live in one space
  (equal sizes) the pair features ``[u, v, u*v, |u-v|, cos]`` of the sentence
  matching literature (InferSent, Conneau et al. 2017) are used, and the
  cosine also has a direct linear path to the logits, so the head starts from
  the dual encoder's own score and learns corrections to it.
* ``late``: one head per modality, their logits mixed by learned per-class
  weights. A sum of per-modality scores cannot model how well a *pair* fits,
  which is why it fails at image–text matching (see
  ``benchmarks/results/fusion-study.md``); it suits tasks where each modality
  carries evidence on its own.
* ``gated``: the Gated Multimodal Unit (Arevalo et al. 2017): each modality is
  projected and squashed with tanh, a sigmoid gate computed from both mixes
  them per unit, an MLP classifies the mix.
* ``cross_attention``: text tokens (queries) attend to the image patch grid
  (keys/values) in pre-LN blocks of multi-head attention + feed-forward with
  residuals; optionally each residual branch is scaled by ``tanh(alpha)`` with
  ``alpha`` initialised at 0 (Flamingo, Alayrac et al. 2022), so the block
  starts as the identity and the image is let in as training goes. The text
  tokens are then mean-pooled over the real (unpadded) tokens and classified.

The embedding-level heads take ``image_embedding`` and ``text_embedding``
only, which is all a vector search has when it reranks (the stored image
embedding and the query's); with ``pooled_image_tokens`` they also see the mean
of the patch tokens. Every head returns ``logits`` (batch, classes): one logit
for matching (``classes=1``), else one per label.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.specs import ExportSpec
from edgemm.runtime.errors import ExportError, InputError
from edgemm.runtime.manifest import TensorSpec

FAMILY = "fusion"
ROLE = "fusion"  # the graph role in a bundle, whichever architecture it holds
OUTPUT = "logits"

# Every feature a head may take, in the order a head's forward() takes the ones it uses.
FEATURE_INPUTS = ("image_embedding", "image_tokens", "text_embedding", "text_tokens", "text_mask")
IMAGE_FEATURES = ("image_embedding", "image_tokens")
TEXT_FEATURES = ("text_embedding", "text_tokens", "text_mask")

# The default towers' feature sizes (EfficientNet-Lite0 ConSE + all-MiniLM-L6-v2).
DEFAULT_DIMS = {"image_dim": 384, "text_dim": 384, "image_token_dim": 1280, "text_token_dim": 384,
                "image_tokens": 49}

# Tower batch sizes for feature extraction: 8 images per pass ran 1.5x faster than 32 (and
# 16) for EfficientNet-Lite0 on 2 CPU cores; short texts are cheap in any batch.
IMAGE_BATCH = 8
TEXT_BATCH = 64
ATOL = 1e-4  # fp32 export tolerance: the heads are small, float32 reorderings stay near 1e-6


@dataclass(frozen=True)
class FusionConfig:
    architecture: str  # a name in ARCHITECTURES: "early" | "late" | "gated" | "cross_attention"
    classes: int  # 1 for matching (a single logit), else the number of labels
    image_dim: int  # image embedding size (384 for the default)
    text_dim: int  # text embedding size (384)
    image_token_dim: int  # patch token size (1280 for EfficientNet-Lite0's 7x7 grid)
    text_token_dim: int  # text token state size (384)
    image_tokens: int  # patches in the image grid (49)
    hidden: int = 256  # width of the head's hidden layers
    heads: int = 4  # attention heads (cross_attention only; must divide hidden)
    layers: int = 1  # cross-attention blocks (cross_attention only)
    dropout: float = 0.1  # dropout inside the head while training
    tanh_gate: bool = False  # Flamingo-style tanh gates, initialised at 0, on the residuals (cross_attention only)
    pooled_image_tokens: bool = False  # early/late/gated also see the mean patch token (needs image_tokens at run time)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"unknown fusion architecture {self.architecture!r}; choose one of "
                             f"{sorted(ARCHITECTURES)}.")
        for name in ("classes", "image_dim", "text_dim", "image_token_dim", "text_token_dim", "image_tokens",
                     "hidden", "heads", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"fusion config: {name} must be a positive integer, got {value!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"fusion config: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.architecture == "cross_attention":
            if self.hidden % self.heads:
                raise InputError(f"fusion config: hidden ({self.hidden}) must be a multiple of heads "
                                 f"({self.heads}) for cross_attention; change one of them.")
            if self.pooled_image_tokens:
                raise InputError("fusion config: pooled_image_tokens is for the embedding heads; cross_attention "
                                 "already reads every patch token. Leave it False.")
        elif self.tanh_gate:
            raise InputError(f"fusion config: tanh_gate applies to cross_attention only, not "
                             f"{self.architecture!r}; leave it False.")

    @classmethod
    def default(cls, architecture: str, classes: int = 1, **overrides: Any) -> FusionConfig:
        """A config sized for the default towers' features.

        Args:
            architecture: A name in ``ARCHITECTURES``.
            classes: 1 for matching, else the number of labels.
            **overrides: Any other field.

        Returns:
            The config.
        """
        return cls(architecture=architecture, classes=classes, **{**DEFAULT_DIMS, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        """The config from its ``to_dict()`` form (e.g. a manifest), checking the keys.

        Raises:
            InputError: A key is unknown or a required one is missing.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"fusion config has unknown keys {unknown}; known keys are {sorted(known)}.")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise InputError(f"fusion config is missing {missing}.")
        return cls(**d)


class FusionHead(nn.Module):
    """Base of the registered heads: named features in, ``logits`` out.

    ``forward`` takes the features named in ``input_names`` positionally, in
    that order (the order of ``FEATURE_INPUTS``), so the module traces to a
    graph whose inputs are exactly those names.

    A head is written as two halves, ``encode_image`` (image features only)
    and ``fuse_encoded`` (that plus the text features): when many pairs share
    an image, as in matching with mined negatives, training encodes each image
    once per batch instead of once per pair (5-10x less work for cross-attention).
    """

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        self.input_names = self.inputs_for(config)

    @classmethod
    def inputs_for(cls, config: FusionConfig) -> tuple[str, ...]:
        """The features this architecture reads under ``config``, in forward order."""
        raise NotImplementedError

    def encode_image(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The image-only part: named image features → named tensors, batch first."""
        raise NotImplementedError

    def fuse_encoded(self, image: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from ``encode_image``'s output and the text features in ``x``."""
        raise NotImplementedError

    def fuse(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse_encoded(self.encode_image(x), x)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) != len(self.input_names):
            raise InputError(f"{type(self).__name__} takes {len(self.input_names)} inputs {list(self.input_names)}, "
                             f"got {len(features)}.")
        return self.fuse(dict(zip(self.input_names, features)))

    def forward_named(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from a dict of features (extra names are ignored)."""
        missing = [n for n in self.input_names if n not in features]
        if missing:
            raise InputError(f"fusion head '{self.config.architecture}' needs features {missing}; "
                             f"got {sorted(features)}.")
        return self.fuse({n: features[n] for n in self.input_names})


ARCHITECTURES: dict[str, type[FusionHead]] = {}


def register_architecture(name: str):
    """Class decorator adding a head to ``ARCHITECTURES`` under ``name`` (each name once)."""

    def add(cls: type[FusionHead]) -> type[FusionHead]:
        if name in ARCHITECTURES:
            raise ExportError(f"fusion architecture '{name}' is registered twice.")
        ARCHITECTURES[name] = cls
        return cls

    return add


def _mlp(cin: int, hidden: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, cout))


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (mask 1), ignoring padding; (N, T, D), (N, T) → (N, D)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def _embedding_inputs(config: FusionConfig) -> tuple[str, ...]:
    if config.pooled_image_tokens:
        return ("image_embedding", "image_tokens", "text_embedding")
    return ("image_embedding", "text_embedding")


class _PooledTokens(nn.Module):
    """Mean patch token, layer-normed: EfficientNet's ReLU6 features are far from unit scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens.mean(1))


def _image_vector(head: FusionHead, x: dict[str, torch.Tensor]) -> torch.Tensor:
    if head.config.pooled_image_tokens:
        return torch.cat([x["image_embedding"], head.pool(x["image_tokens"])], dim=-1)
    return x["image_embedding"]


@register_architecture("early")
class EarlyFusion(FusionHead):
    """Concatenated features → MLP; pair features and a cosine path when the spaces match.

    With ``pooled_image_tokens`` the mean patch token is projected into the
    text space and paired with the text embedding the same way, since an MLP
    over a plain concatenation learns cross-modal products poorly.
    """

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        self.pair = config.image_dim == config.text_dim
        pooled = config.pooled_image_tokens
        if pooled:
            self.pool = _PooledTokens(config.image_token_dim)
            self.project = nn.Linear(config.image_token_dim, config.text_dim)
        images = 1 + pooled  # image vectors paired with the text: the embedding, and the projected patches
        pair_width = 3 * config.text_dim + 1  # [x, x*v, |x-v|, cos(x, v)] per image vector x
        width = (config.text_dim + images * pair_width if self.pair
                 else config.image_dim + config.text_dim + (config.text_dim if pooled else 0))
        self.mlp = _mlp(width, config.hidden, config.classes, config.dropout)
        if self.pair:
            self.cosine = nn.Linear(images, config.classes)

    @classmethod
    def inputs_for(cls, config: FusionConfig) -> tuple[str, ...]:
        return _embedding_inputs(config)

    def encode_image(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = {"embedding": x["image_embedding"]}
        if self.config.pooled_image_tokens:
            image["patches"] = self.project(self.pool(x["image_tokens"]))
        return image

    def fuse_encoded(self, image: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        v = x["text_embedding"]
        images = list(image.values())
        if not self.pair:
            return self.mlp(torch.cat([*images, v], dim=-1))
        parts, cosines = [v], []
        for u in images:
            cos = (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1, keepdim=True)
            parts += [u, u * v, (u - v).abs(), cos]
            cosines.append(cos)
        return self.mlp(torch.cat(parts, dim=-1)) + self.cosine(torch.cat(cosines, dim=-1))


@register_architecture("late")
class LateFusion(FusionHead):
    """A head per modality; logits = w_image * image_logits + w_text * text_logits + b, per class."""

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        image_in = config.image_dim + (config.image_token_dim if config.pooled_image_tokens else 0)
        if config.pooled_image_tokens:
            self.pool = _PooledTokens(config.image_token_dim)
        self.image_head = _mlp(image_in, config.hidden, config.classes, config.dropout)
        self.text_head = _mlp(config.text_dim, config.hidden, config.classes, config.dropout)
        self.weights = nn.Parameter(torch.ones(2, config.classes))
        self.bias = nn.Parameter(torch.zeros(config.classes))

    @classmethod
    def inputs_for(cls, config: FusionConfig) -> tuple[str, ...]:
        return _embedding_inputs(config)

    def encode_image(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.image_head(_image_vector(self, x))}

    def fuse_encoded(self, image: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.text_head(x["text_embedding"])
        return self.weights[0] * image["logits"] + self.weights[1] * text + self.bias


@register_architecture("gated")
class GatedFusion(FusionHead):
    """Gated Multimodal Unit: h = z * tanh(W_i x_i) + (1 - z) * tanh(W_t x_t), z = sigmoid(W_z [x_i, x_t])."""

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        image_in = config.image_dim + (config.image_token_dim if config.pooled_image_tokens else 0)
        if config.pooled_image_tokens:
            self.pool = _PooledTokens(config.image_token_dim)
        self.image_proj = nn.Linear(image_in, config.hidden)
        self.text_proj = nn.Linear(config.text_dim, config.hidden)
        self.gate = nn.Linear(image_in + config.text_dim, config.hidden)
        self.classifier = _mlp(config.hidden, config.hidden, config.classes, config.dropout)

    @classmethod
    def inputs_for(cls, config: FusionConfig) -> tuple[str, ...]:
        return _embedding_inputs(config)

    def encode_image(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = _image_vector(self, x)
        return {"vector": image, "hidden": torch.tanh(self.image_proj(image))}

    def fuse_encoded(self, image: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        text = x["text_embedding"]
        z = torch.sigmoid(self.gate(torch.cat([image["vector"], text], dim=-1)))
        h = z * image["hidden"] + (1 - z) * torch.tanh(self.text_proj(text))
        return self.classifier(h)


class CrossAttentionBlock(nn.Module):
    """Pre-LN block: x += g_a * MHA(LN(x), LN(img)); x += g_f * FFN(LN(x)); g = tanh(alpha) or 1.

    Attention is written out (not ``nn.MultiheadAttention``) so the traced
    graph is plain MatMul/Softmax with dynamic batch and sequence axes.
    """

    def __init__(self, dim: int, heads: int, dropout: float, tanh_gate: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.tanh_gate = tanh_gate
        if tanh_gate:  # Flamingo: alpha = 0 makes the block the identity at initialisation
            self.alpha_attn = nn.Parameter(torch.zeros(1))
            self.alpha_ff = nn.Parameter(torch.zeros(1))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.reshape(n, length, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q = self._split(self.q(self.norm_q(x)))
        k, v = self.kv(self.norm_kv(image)).chunk(2, dim=-1)
        weights = torch.softmax(q @ self._split(k).transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        mixed = (self.drop(weights) @ self._split(v)).transpose(1, 2).reshape(n, length, dim)
        return self.out(mixed)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        attn = self.drop(self.attend(x, image))
        ff_in = x + (torch.tanh(self.alpha_attn) * attn if self.tanh_gate else attn)
        ff = self.drop(self.ff(self.norm_ff(ff_in)))
        return ff_in + (torch.tanh(self.alpha_ff) * ff if self.tanh_gate else ff)


@register_architecture("cross_attention")
class CrossAttentionFusion(FusionHead):
    """Text tokens attend to image patch tokens; masked mean over text tokens → logits."""

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        self.text_in = nn.Linear(config.text_token_dim, config.hidden)
        self.image_norm = nn.LayerNorm(config.image_token_dim)
        self.image_in = nn.Linear(config.image_token_dim, config.hidden)
        self.position = nn.Parameter(torch.randn(1, config.image_tokens, config.hidden) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(config.hidden, config.heads, config.dropout, config.tanh_gate)
                                    for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.classifier = nn.Linear(config.hidden, config.classes)

    @classmethod
    def inputs_for(cls, config: FusionConfig) -> tuple[str, ...]:
        return ("image_tokens", "text_tokens", "text_mask")

    def encode_image(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"patches": self.image_in(self.image_norm(x["image_tokens"])) + self.position}

    def fuse_encoded(self, image: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.text_in(x["text_tokens"])
        for block in self.blocks:
            text = block(text, image["patches"])
        return self.classifier(self.norm(_masked_mean(text, x["text_mask"])))


def build_head(config: FusionConfig) -> FusionHead:
    """The untrained head for ``config`` (``.input_names`` lists the features it reads).

    Raises:
        InputError: The config names no registered architecture.
    """
    if config.architecture not in ARCHITECTURES:
        raise InputError(f"unknown fusion architecture {config.architecture!r}; choose one of "
                         f"{sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[config.architecture](config)


def feature_specs(config: FusionConfig) -> dict[str, TensorSpec]:
    """Name → graph tensor spec of every feature a head under ``config`` could read."""
    return {
        "image_embedding": TensorSpec("image_embedding", "float32", ["batch", config.image_dim]),
        "image_tokens": TensorSpec("image_tokens", "float32", ["batch", config.image_tokens, config.image_token_dim]),
        "text_embedding": TensorSpec("text_embedding", "float32", ["batch", config.text_dim]),
        "text_tokens": TensorSpec("text_tokens", "float32", ["batch", "seq", config.text_token_dim]),
        "text_mask": TensorSpec("text_mask", "int64", ["batch", "seq"]),
    }


def random_features(config: FusionConfig, batch: int, seq: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Feature-shaped random arrays (unit embeddings, ReLU6-range patches, ragged masks), for tracing and tests."""
    rng = np.random.default_rng(seed)

    def unit(n: int, d: int) -> np.ndarray:
        a = rng.standard_normal((n, d)).astype(np.float32)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # the batch's longest fills the sequence, as a tokenizer pads it
    return {
        "image_embedding": unit(batch, config.image_dim),
        "image_tokens": rng.uniform(0, 6, (batch, config.image_tokens, config.image_token_dim)).astype(np.float32),
        "text_embedding": unit(batch, config.text_dim),
        "text_tokens": rng.standard_normal((batch, seq, config.text_token_dim)).astype(np.float32),
        "text_mask": (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64),
    }


def fusion_spec(config: FusionConfig) -> ExportSpec:
    """The export spec of the head ``config`` builds: role "fusion", its inputs only, ``logits`` out.

    Batch is dynamic everywhere and ``seq`` on the text tokens; the patch count is fixed.

    Raises:
        InputError: The config names no registered architecture.
    """
    names = ARCHITECTURES[config.architecture].inputs_for(config)
    specs = feature_specs(config)

    def dummy() -> tuple[torch.Tensor, ...]:
        feats = random_features(config, 2, 5)
        return tuple(torch.from_numpy(feats[n]) for n in names)

    return ExportSpec(
        role=ROLE,
        family=FAMILY,
        inputs=tuple(specs[n] for n in names),
        outputs=(TensorSpec(OUTPUT, "float32", ["batch", config.classes]),),
        dummy_inputs=dummy,
        atol=ATOL,
    )


class _HeadOnly(nn.Module):
    """Stands in for a classifier: feature map in, ``forward_head`` out."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_head(features)


@contextmanager
def _classifier_head_only(image_tower: nn.Module) -> Iterator[None]:
    """Let ``image_tower`` take a feature map instead of pixels, so the backbone runs once per image."""
    classifier = image_tower.classifier
    image_tower.classifier = _HeadOnly(classifier)
    try:
        yield
    finally:
        image_tower.classifier = classifier


@torch.no_grad()
def tower_features(image_tower: nn.Module, text_embedder: Any, pixels: np.ndarray | None,
                   texts: Sequence[str] | None, *, batch_size: int = IMAGE_BATCH) -> dict[str, np.ndarray]:
    """Frozen tower features by name, the inputs a fusion head reads.

    Args:
        image_tower: A ``ConseImageTower`` (its ``.classifier`` has ``forward_features``/``forward_head``).
        text_embedder: A ``TextEmbedder`` (``.feeds(texts)`` and ``.tower.token_states``).
        pixels: Preprocessed images (N, 3, S, S) float32 (``reference_pixels``), or None.
        texts: Texts, or None.
        batch_size: Images per forward pass (texts go 64 at a time).

    Returns:
        ``image_embedding`` (N, D) and ``image_tokens`` (N, patches, C) for pixels;
        ``text_embedding`` (M, D), ``text_tokens`` (M, T, D) and ``text_mask``
        (M, T) int64 for texts, padded to the longest text given. All float32
        except the mask.

    Raises:
        InputError: Pixels of the wrong shape, or a text that is not a string.
    """
    out: dict[str, np.ndarray] = {}
    if pixels is not None:
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InputError(f"pixels must be (N, 3, H, W) preprocessed images, got shape {pixels.shape}; "
                             "make them with reference_pixels().")
        if not len(pixels):
            raise InputError("pixels holds no images; pass at least one, or None for no image features.")
        was_training = image_tower.training
        image_tower.eval()
        embeddings, tokens = [], []
        try:
            for i in range(0, len(pixels), batch_size):
                fmap = image_tower.classifier.forward_features(torch.from_numpy(pixels[i:i + batch_size]).float())
                with _classifier_head_only(image_tower):
                    embedding = image_tower(fmap)[0]
                embeddings.append(embedding.numpy())
                tokens.append(fmap.flatten(2).transpose(1, 2).contiguous().numpy())
        finally:
            image_tower.train(was_training)
        out["image_embedding"] = np.concatenate(embeddings).astype(np.float32)
        out["image_tokens"] = np.concatenate(tokens).astype(np.float32)
    if texts is not None:
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts must be strings; entries {bad[:5]} are not.")
        if not texts:
            raise InputError("texts is empty; pass at least one text, or None for no text features.")
        tower = text_embedder.tower
        embeddings, states, masks = [], [], []
        for i in range(0, len(texts), TEXT_BATCH):
            feeds = text_embedder.feeds(texts[i:i + TEXT_BATCH])
            ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
            embeddings.append(tower(ids, mask).numpy())
            states.append(tower.token_states(ids, mask).numpy())
            masks.append(feeds["attention_mask"])
        length = max(m.shape[1] for m in masks)
        dim = states[0].shape[2]
        tokens = np.zeros((len(texts), length, dim), np.float32)
        mask = np.zeros((len(texts), length), np.int64)
        row = 0
        for s, m in zip(states, masks):
            tokens[row:row + len(s), :s.shape[1]] = s * m[:, :, None]  # padding states zeroed: they mean nothing
            mask[row:row + len(m), :m.shape[1]] = m
            row += len(s)
        out["text_embedding"] = np.concatenate(embeddings).astype(np.float32)
        out["text_tokens"] = tokens
        out["text_mask"] = mask
    return out
