"""Users' captioners from a local Hugging Face folder: ViT/DeiT + GPT-2 ``VisionEncoderDecoderModel``, BLIP.

``CaptionCheckpoint(folder)`` loads the folder as ``save_pretrained`` wrote it
(model, image processor, tokenizer, generation config) and gives the parts
:func:`~edgemm.export.models.captioner.build_captioner_bundle` exports: the
image side, the decoder as a :class:`~edgemm.export.models.captioner.StepDecoder`,
the preprocessing and tokenizer the runtime reproduces, the generation settings
``generate()`` would use, and ``generate()`` itself as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgemm.export.models.captioner import BlipTextStep, CaptionerParts, Gpt2Step, StepDecoder, _cut
from edgemm.export.models.clip import (check_weights, image_preprocess_from_processor, load_folder_tokenizer,
                                      read_folder_config, read_processor_config)
from edgemm.runtime.errors import ExportError

ENCODERS = ("vit", "deit")  # VisionEncoderDecoderModel encoders edgemm exports
DECODERS = {"gpt2": Gpt2Step}  # … and decoders
SUPPORTED = ("VisionEncoderDecoderModel (ViT or DeiT encoder + GPT-2 decoder, the 'vit-gpt2' family)",
             "BlipForConditionalGeneration (BLIP base/large captioning)",
             "BlipForQuestionAnswering (BLIP visual question answering)")

# generate() settings edgemm's generation loop implements (runtime/generation.py: GenerationSettings) …
IMPLEMENTED = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "do_sample",
               "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty",
               "no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens")
# … token ids it reads separately, settings that do not change the tokens, and values that switch a feature off.
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
NO_EFFECT = ("use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
             "return_dict_in_generate", "transformers_version", "_from_model_config", "cache_implementation",
             "cache_config", "compile_config", "disable_compile", "is_assistant", "num_assistant_tokens",
             "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
             "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
             "continuous_batching_config", "prefill_chunk_size", "max_cache_len")
NEUTRAL = {"num_return_sequences": 1, "remove_invalid_values": False, "renormalize_logits": False,
           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "guidance_scale": 1.0, "low_memory": False,
           "num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
           "encoder_no_repeat_ngram_size": 0, "token_healing": False, "use_mtp": False}


def captioner_kind(folder: str | Path) -> str:
    """``"vision-encoder-decoder"``, ``"blip"`` or ``"blip-vqa"`` for a folder edgemm can export as a captioner.

    Raises:
        ExportError: Not a checkpoint folder, or a model edgemm does not export (naming what it does export).
    """
    folder = Path(folder)
    config = read_folder_config(folder)
    model_type = config.get("model_type")
    supported = "edgemm exports captioners of these kinds: " + "; ".join(SUPPORTED) + "."
    if model_type == "vision-encoder-decoder":
        enc = (config.get("encoder") or {}).get("model_type")
        dec = (config.get("decoder") or {}).get("model_type")
        if enc not in ENCODERS or dec not in DECODERS:
            raise ExportError(f"'{folder}' is a VisionEncoderDecoderModel with a {enc!r} encoder and a {dec!r} "
                              f"decoder; {supported}")
    elif model_type == "blip":
        architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
        if "BlipForQuestionAnswering" in architectures:
            model_type = "blip-vqa"
        elif "BlipForConditionalGeneration" not in architectures:
            raise ExportError(f"'{folder}' holds {architectures}; {supported}")
    else:
        raise ExportError(f"'{folder}' holds a {model_type!r} model ({config.get('architectures')}); {supported}")
    check_weights(folder)
    return model_type


def generation_settings(config: Any, prompt_length: int) -> dict[str, Any]:
    """The settings of a transformers ``GenerationConfig`` that edgemm reproduces, in GenerationSettings' terms.

    Raises:
        ExportError: The config sets something edgemm's loop does not implement (it would be ignored silently).
    """
    values = {k: v for k, v in config.to_dict().items() if v is not None}
    unsupported = {k: v for k, v in values.items()
                   if k not in (*IMPLEMENTED, *TOKEN_IDS, *NO_EFFECT) and NEUTRAL.get(k, object()) != v}
    if unsupported:
        raise ExportError(f"the folder's generation config sets {unsupported}, which edgemm's generation loop does "
                          f"not implement (it implements {', '.join(IMPLEMENTED)}). Remove those settings from "
                          "generation_config.json (or config.json) and export again.")
    settings = {k: values[k] for k in IMPLEMENTED if k in values}
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        if key in settings:
            settings[key] = [int(t) for t in settings[key]]
    if "max_new_tokens" not in settings:
        settings["max_length"] = int(settings.get("max_length", 20))
    if settings.get("max_new_tokens") is None and settings["max_length"] <= prompt_length:
        raise ExportError(f"the generation config's max_length={settings['max_length']} leaves no room after the "
                          f"decoder's {prompt_length} start tokens.")
    return settings


class _VedImage(nn.Module):
    """A VisionEncoderDecoderModel's encoder side: pixels → the states its decoder cross-attends to."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.proj = getattr(model, "enc_to_dec_proj", None)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.encoder(pixel_values=pixels)[0]
        return self.proj(states) if self.proj is not None else states


class _BlipImage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision = model.vision_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels)[0]


class _BlipQuestion(nn.Module):
    """BLIP's question encoder: the question's tokens cross-attending to the image states."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_states, return_dict=False)[0]


class CaptionCheckpoint:
    """A loaded local captioner folder and the reference it is verified against.

    Raises:
        ExportError: Not a supported, complete captioner folder.
    """

    def __init__(self, folder: str | Path):
        import transformers

        self.folder = Path(folder).absolute()
        self.kind = captioner_kind(self.folder)
        cls = {"vision-encoder-decoder": transformers.VisionEncoderDecoderModel,
               "blip": transformers.BlipForConditionalGeneration,
               "blip-vqa": transformers.BlipForQuestionAnswering}[self.kind]
        try:
            model = cls.from_pretrained(str(self.folder), local_files_only=True, attn_implementation="eager")
        except Exception as e:  # transformers raises many types for a broken folder
            raise ExportError(f"'{self.folder}': loading {cls.__name__} failed: {type(e).__name__}: {e}") from e
        self.model = model.eval()
        self.architecture = cls.__name__
        if self.kind == "vision-encoder-decoder":
            config = model.config
            start = config.decoder_start_token_id
            if start is None:
                start = model.generation_config.decoder_start_token_id
            eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
                else config.decoder.eos_token_id
            pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None \
                else config.pad_token_id
            self.image_states: nn.Module = _VedImage(model).eval()
            self.decoder: StepDecoder = DECODERS[config.decoder.model_type](model.decoder).eval()
            self.image_size = int(config.encoder.image_size)
            self.generation_config = model.generation_config
            self.prompt = False
            self.question_encoder = None
        elif self.kind == "blip-vqa":
            text = model.config.text_config
            start, eos, pad = model.decoder_start_token_id, text.sep_token_id, text.pad_token_id
            self.image_states = _BlipImage(model).eval()
            self.question_encoder: nn.Module | None = _BlipQuestion(model.text_encoder).eval()
            self.decoder = BlipTextStep(model.text_decoder).eval()
            self.image_size = int(model.config.vision_config.image_size)
            self.generation_config = model.text_decoder.generation_config
            self.prompt = False
        else:
            text = model.config.text_config
            start, eos, pad = text.bos_token_id, text.sep_token_id, text.pad_token_id
            self.image_states = _BlipImage(model).eval()
            self.decoder = BlipTextStep(model.text_decoder).eval()
            self.image_size = int(model.config.vision_config.image_size)
            # BLIP's generate() calls text_decoder.generate(), which decodes with the text decoder's own config.
            self.generation_config = model.text_decoder.generation_config
            self.prompt = True
            self.question_encoder = None
        if start is None or eos is None:
            raise ExportError(f"'{self.folder}': the config names no decoder start token or no end token; set "
                              "decoder_start_token_id and eos_token_id in its generation config.")
        self.start_ids = [int(start)]
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.settings = generation_settings(self.generation_config, len(self.start_ids))
        self.tokenizer = load_folder_tokenizer(self.folder)
        self.image_spec = image_preprocess_from_processor(read_processor_config(self.folder), self.image_size)
        self._processor = None

    @property
    def decoder_lm(self) -> nn.Module:
        """The transformers decoder LM (GPT-2 or BLIP's text decoder) that writes the captions."""
        return self.model.decoder if self.kind == "vision-encoder-decoder" else self.model.text_decoder

    def use_decoder(self, lm: nn.Module) -> None:
        """Replace the decoder LM (by a distilled student of it): the parts, the reference and the logits use it."""
        if self.kind == "vision-encoder-decoder":
            self.model.decoder = lm
            self.model.config.decoder = lm.config
            self.decoder = DECODERS[lm.config.model_type](lm).eval()
        else:
            self.model.text_decoder = lm
            self.model.config.text_config = lm.config
            self.decoder = BlipTextStep(lm).eval()

    def pixels(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """The folder's own Hugging Face image processor: the reference preprocessing."""
        from PIL import Image
        from transformers import AutoImageProcessor

        if self._processor is None:
            self._processor = AutoImageProcessor.from_pretrained(str(self.folder), local_files_only=True, backend="pil")
        out = self._processor(images=[Image.fromarray(im) for im in images_rgb], return_tensors="np")
        return out["pixel_values"].astype(np.float32)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The reference's decoder ids for a text prompt (BLIP: the tokenizer's ids with [CLS] → [DEC], [SEP] cut)."""
        ids = self.tokenizer(prompt).input_ids
        return [*self.start_ids, *ids[1:-1]]

    @torch.no_grad()
    def generate(self, pixels: np.ndarray, settings: dict[str, Any], prompt: str | None = None) -> list[list[int]]:
        """transformers' ``generate()`` on preprocessed pixels: the token ids it returns, one list per image,
        cut after the first end token (transformers pads finished rows)."""
        px = torch.from_numpy(pixels)
        kwargs = {k: v for k, v in settings.items() if k != "seed"}  # seeded sampling is not compared
        if self.kind == "blip-vqa":  # ``prompt`` is the question
            ids = torch.tensor([self.tokenizer(prompt).input_ids] * len(px))
            out = self.model.generate(input_ids=ids, pixel_values=px, **kwargs)
            return [_cut(row, len(self.start_ids), self.eos_ids) for row in out.tolist()]
        if self.kind == "blip" and prompt is not None:
            ids = torch.tensor([self.tokenizer(prompt).input_ids] * len(px))
            out = self.model.generate(pixel_values=px, input_ids=ids, **kwargs)
        elif prompt is not None:
            raise ExportError("this captioner takes no prompt.")
        else:
            out = self.model.generate(pixel_values=px, **kwargs)
        start = len(self.prompt_ids(prompt)) if prompt else len(self.start_ids)
        return [_cut(row, start, self.eos_ids) for row in out.tolist()]

    @torch.no_grad()
    def logits(self, pixels: np.ndarray, ids: np.ndarray, question: str | None = None) -> np.ndarray:
        """The model's logits for decoder ids (batch, length) in one full forward pass (no cache)."""
        px, ids_t = torch.from_numpy(pixels), torch.from_numpy(ids)
        if self.kind == "blip-vqa":
            image = self.model.vision_model(pixel_values=px)[0]
            q = torch.tensor([self.tokenizer(question).input_ids] * len(px))
            states = self.model.text_encoder(input_ids=q, attention_mask=torch.ones_like(q),
                                             encoder_hidden_states=image, return_dict=False)[0]
            return self.model.text_decoder(input_ids=ids_t, encoder_hidden_states=states).logits.float().numpy()
        if self.kind == "blip":
            memory = self.model.vision_model(pixel_values=px)[0]
            return self.model.text_decoder(input_ids=ids_t, encoder_hidden_states=memory).logits.float().numpy()
        return self.model(pixel_values=px, decoder_input_ids=ids_t).logits.float().numpy()

    def parts(self, name: str | None = None) -> CaptionerParts:
        return CaptionerParts(
            name=name or self.folder.name, image_states=self.image_states, decoder=self.decoder,
            image=self.image_spec, tokenizer=self.tokenizer.backend_tokenizer, start_ids=self.start_ids,
            eos_ids=self.eos_ids, pad_id=self.pad_id, prompt=self.prompt, settings=self.settings,
            source={"kind": "huggingface", "path": str(self.folder), "model_type": self.kind,
                    "architecture": self.architecture},
            reference=self.generate, reference_logits=self.logits,
            reference_prompt_ids=self.prompt_ids if self.prompt else None,
            reference_decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            reference_pixels=self.pixels, question_encoder=self.question_encoder,
        )
