"""Tiny random-weight CLIP checkpoints laid out exactly like a user's folder.

Real ``transformers`` classes saved with ``save_pretrained``, a real
``CLIPImageProcessor`` and the real CLIP BPE tokenizer (built from OpenAI's
merges file in tests/data, as CLIP's own code builds it). Only the weights are
random: no model with aligned weights ships in a package reachable here.

Also a command, for the benchmarks: ``python tests/tiny_checkpoints.py OUT --preset bench``.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

DATA = Path(__file__).parent / "data"
MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges

PRESETS = {
    # hidden, layers, heads, image size, patch, projection
    "test": dict(hidden=32, layers=2, heads=2, image_size=32, patch=8, projection=16),
    "bench": dict(hidden=256, layers=6, heads=4, image_size=224, patch=32, projection=256),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_clip_tokenizer(folder: Path) -> None:
    """Write CLIP's real BPE tokenizer (tokenizer.json and its config) into ``folder``."""
    from transformers import CLIPTokenizer

    lines = gzip.decompress((DATA / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                        model_max_length=77)
    tok.save_pretrained(str(folder))


def make_tiny_clip(folder: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """A CLIPModel folder with random weights, its image processor and tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    p = PRESETS[preset]
    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=p["hidden"], intermediate_size=4 * p["hidden"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"], max_position_embeddings=77),
        vision_config=dict(hidden_size=p["hidden"], intermediate_size=4 * p["hidden"], num_hidden_layers=p["layers"],
                           num_attention_heads=p["heads"], image_size=p["image_size"], patch_size=p["patch"]),
        projection_dim=p["projection"],
    )
    CLIPModel(config).eval().save_pretrained(str(folder))
    size = p["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))
    save_clip_tokenizer(folder)
    return folder


def save_siglip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A real SentencePiece unigram model, trained here on class names and sentences, as a SiglipTokenizer."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    from edgemm.export.models.dual_encoder import imagenet_class_names
    from edgemm.runtime.datasets import SAMPLE_SENTENCES

    names = imagenet_class_names()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([*names, *SAMPLE_SENTENCES, *(f"a photo of a {n}" for n in names)]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=800, model_type="unigram", pad_id=1,
        eos_id=2, unk_id=3, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    SiglipTokenizer(str(folder / "sp.model"), model_max_length=max_length).save_pretrained(str(folder))
    for leftover in ("corpus.txt", "sp.model", "sp.vocab"):
        (folder / leftover).unlink()


def make_tiny_siglip(folder: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """A SiglipModel folder with random weights, its image processor and SentencePiece tokenizer."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    p = PRESETS[preset]
    folder = Path(folder)
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(vocab_size=800, hidden_size=p["hidden"], intermediate_size=4 * p["hidden"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"], max_position_embeddings=16,
                         bos_token_id=None, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=p["hidden"], intermediate_size=4 * p["hidden"], num_hidden_layers=p["layers"],
                           num_attention_heads=p["heads"], image_size=p["image_size"], patch_size=p["patch"]),
    )
    SiglipModel(config).eval().save_pretrained(str(folder))
    size = p["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(str(folder))
    save_siglip_tokenizer(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--kind", choices=("clip", "siglip"), default="clip")
    args = parser.parse_args()
    make = make_tiny_clip if args.kind == "clip" else make_tiny_siglip
    print(make(args.out, args.preset))


if __name__ == "__main__":
    main()
