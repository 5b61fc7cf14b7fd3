"""Does the built-in generative captioner beat retrieval and templates? Measured on held-out images.

Methods, all on the default image tower's output (EfficientNet-Lite0 + ConSE in
all-MiniLM-L6-v2's space):

* generative: the committed adapter + Whisper tiny.en's decoder, decoded in
  PyTorch with ``transformers``' ``generate()`` on the ``WhisperForCausalLM``
  (``encoder_outputs`` = the adapter's memory): greedy, beam 3, and the
  settings the training script picked on the validation split;
* retrieval: the training caption (emoji train names, Fashion-MNIST class
  captions, ImageNet class captions) whose text embedding is nearest the image
  embedding;
* retrieval by image: the caption of the nearest training image (emoji train,
  Fashion-MNIST train), to show what the adapter's image supervision alone buys;
* template: the top ImageNet class as "a {class}" and as "a photo of a {class}".

Held-out sources, disjoint from every image the adapter trained or was
validated on: the emoji test split (``runtime.datasets.split_rows``: names never in
training; ImageNet names equal to a held-out emoji name were dropped from
training too), the first 1000 Fashion-MNIST *test* images (the classes, and so
the captions, are the training ones: only the images are new), and the 15
sample photos (never trained on; their references come from their subjects).

Metrics (``edgemm._caption_metrics``, coco-caption conventions): corpus
BLEU-1/2, CIDEr-D (document frequency over each evaluated set's references),
exact match, and caption→label accuracy: the caption is embedded by the text
tower and must be nearest its own label among the source's labels.

Usage:
    python benchmarks/captioner_study.py [--cache ~/.cache/edgemm/captioner]
                                         [--out benchmarks/results/captioner-study] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgemm._caption_metrics import caption_scores  # noqa: E402
from edgemm.export.models.default_captioner import (FASHION_CAPTIONS, FASHION_TRAIN,  # noqa: E402
                                                    GenerationSettings, _Targets,
                                                    caption_data, decode_embeddings, default_captioner,
                                                    emoji_references, fashion_caption, held_out_references,
                                                    imagenet_captions, with_article)
from edgemm.export.models.dual_encoder import default_towers, reference_pixels  # noqa: E402
from edgemm.runtime.datasets import (FASHION_MNIST_CLASSES, PHOTO_REFERENCES, SAMPLE_LABELS,  # noqa: E402
                                     sample_photos)

ROOT = Path(__file__).resolve().parents[1]


def held_out(data: Any) -> dict[str, dict[str, Any]]:
    """Per source: image embeddings, class probabilities, references, label texts and each item's label index."""
    test = data.emoji_splits["test"]
    emoji_labels = [data.emoji_names[r] for r in test]
    fashion_labels = [c.lower() for c in FASHION_MNIST_CLASSES]
    return {
        "emoji": {"embedding": data.emoji["embedding"][test], "probs": data.emoji["probs"][test],
                  "refs": [emoji_references(n) for n in emoji_labels], "labels": emoji_labels,
                  "label": np.arange(len(test))},
        "fashion_mnist": {"embedding": data.fashion_test["embedding"], "probs": data.fashion_test["probs"],
                          "refs": [list(FASHION_CAPTIONS[FASHION_MNIST_CLASSES[int(c)]])
                                   for c in data.fashion_test["label"]],
                          "labels": fashion_labels, "label": data.fashion_test["label"].astype(np.int64)},
        "photos": {"embedding": data.photos["embedding"], "probs": data.photos["probs"],
                   "refs": [PHOTO_REFERENCES[lab] for lab in data.photo_labels], "labels": list(SAMPLE_LABELS),
                   "label": np.array([SAMPLE_LABELS.index(lab) for lab in data.photo_labels])},
    }


def label_accuracy(text: Any, captions: list[str], labels: list[str], truth: np.ndarray) -> float:
    """Share of captions whose text embedding is nearest their own label's among the source's labels."""
    c = text(captions).numpy()
    lab = text(labels).numpy()
    return float(np.mean((c @ lab.T).argmax(1) == truth))


def score(captions: dict[str, list[str]], sources: dict[str, dict[str, Any]], text: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, src in sources.items():
        caps = captions[name]
        out[name] = {**caption_scores(caps, src["refs"]),
                     "label_accuracy": label_accuracy(text, caps, src["labels"], src["label"]), "n": len(caps)}
    every = [c for name in sources for c in captions[name]]
    refs = [r for src in sources.values() for r in src["refs"]]
    out["overall"] = {**caption_scores(every, refs), "n": len(every),
                      "label_accuracy": float(np.average([out[s]["label_accuracy"] for s in sources],
                                                         weights=[out[s]["n"] for s in sources]))}
    out["macro"] = {k: float(np.mean([out[s][k] for s in sources]))
                    for k in ("bleu1", "bleu2", "cider_d", "exact_match", "label_accuracy")}
    return out


def run(cache: str) -> dict[str, Any]:
    towers = default_towers()
    image, text, names = towers
    data = caption_data(cache, towers)
    sources = held_out(data)
    captioner = default_captioner(towers=towers)
    adapter, decoder = captioner.image_encoder.adapter, captioner.decoder

    # The cached embeddings are the tower's own output: check that the full image encoder gives the same memory.
    photos = sample_photos()
    with torch.no_grad():
        direct = captioner.image_encoder(torch.from_numpy(reference_pixels([p.image for p in photos]))).numpy()
        cached = adapter(torch.from_numpy(sources["photos"]["embedding"])).numpy()
    memory_diff = float(np.abs(direct - cached).max())

    methods: dict[str, dict[str, list[str]]] = {}
    timings: dict[str, float] = {}
    targets = _Targets()
    settings = {"generative greedy": GenerationSettings(), "generative beam 3": GenerationSettings(num_beams=3)}
    shipped = captioner.generation
    if shipped not in settings.values():
        settings[f"generative shipped ({_describe(shipped)})"] = shipped
    for label, s in settings.items():
        t = time.time()
        methods[label] = {k: decode_embeddings(adapter, decoder, src["embedding"], s, targets)
                          for k, src in sources.items()}
        timings[label] = time.time() - t

    exclude = held_out_references(data)
    train_caps = [with_article(data.emoji_names[r]) for r in data.emoji_splits["train"]]
    train_caps += [fashion_caption(c) for c in range(10)] + imagenet_captions(data, exclude)[1]
    train_caps = list(dict.fromkeys(train_caps))
    bank = text(train_caps).numpy()
    methods["retrieval (nearest training caption)"] = {
        k: [train_caps[i] for i in (src["embedding"] @ bank.T).argmax(1)] for k, src in sources.items()}
    # The same idea over the training *images* (k = 1): what the generative model's image supervision buys.
    seen = np.r_[data.emoji["embedding"][data.emoji_splits["train"]], data.fashion_train["embedding"][:FASHION_TRAIN]]
    seen_caps = [with_article(data.emoji_names[r]) for r in data.emoji_splits["train"]]
    seen_caps += [fashion_caption(int(c)) for c in data.fashion_train["label"][:FASHION_TRAIN]]
    methods["retrieval (caption of nearest training image)"] = {
        k: [seen_caps[i] for i in (src["embedding"] @ seen.T).argmax(1)] for k, src in sources.items()}
    methods["template: a {top class}"] = {k: [with_article(names[i]) for i in src["probs"].argmax(1)]
                                         for k, src in sources.items()}
    methods["template: a photo of a {top class}"] = {
        k: ["a photo of " + with_article(names[i]) for i in src["probs"].argmax(1)] for k, src in sources.items()}

    results = {m: score(caps, sources, text) for m, caps in methods.items()}
    photo_rows = [{"photo": p.name, "subject": p.label, **{m: methods[m]["photos"][i] for m in methods}}
                  for i, p in enumerate(photos)]
    return {
        "sources": {k: len(v["refs"]) for k, v in sources.items()},
        "results": results, "photo_captions": photo_rows,
        "decode_seconds": {k: round(v, 1) for k, v in timings.items()},
        "shipped_generation": asdict(shipped), "memory_max_abs_diff_cached_vs_pixels": memory_diff,
        "training": {k: captioner.record[k] for k in ("config", "options", "data", "seconds") if k in captioner.record},
        "validation_best": captioner.record.get("validation", {}).get("best"),
        "generation_sweep": captioner.record.get("generation_sweep"),
        "retrieval_bank": len(train_caps),
        "torch_threads": torch.get_num_threads(),
        "examples": {m: {k: caps[k][:8] for k in ("emoji", "fashion_mnist")} for m, caps in methods.items()},
        "emoji_references": [r[0] for r in sources["emoji"]["refs"][:8]],
    }


def _describe(s: GenerationSettings) -> str:
    parts = ["greedy" if s.num_beams == 1 else f"beam {s.num_beams}"]
    if s.no_repeat_ngram_size:
        parts.append(f"no-repeat {s.no_repeat_ngram_size}")
    if s.repetition_penalty != 1.0:
        parts.append(f"rep. penalty {s.repetition_penalty:g}")
    return ", ".join(parts)


def markdown(r: dict[str, Any]) -> str:
    src = r["sources"]
    lines = [
        "## Default captioner: generative (adapter + Whisper tiny.en decoder) vs retrieval vs template",
        "",
        f"Held-out: emoji test split ({src['emoji']} images, names never trained on), Fashion-MNIST test "
        f"({src['fashion_mnist']} images; classes shared with training), the {src['photos']} sample photos. "
        "BLEU/CIDEr-D/exact match per coco-caption conventions (`edgemm._caption_metrics`); label acc. = the "
        "caption's text embedding is nearest its own label among the source's labels. Reproduce: "
        "`python benchmarks/captioner_study.py`.",
        "",
    ]
    metrics = ("bleu1", "bleu2", "cider_d", "exact_match", "label_accuracy")
    for part in ("emoji", "fashion_mnist", "photos", "overall", "macro"):
        title = {"overall": "overall (pooled items)", "macro": "macro (mean of the three sources)"}.get(part, part)
        lines += [f"### {title}", "", "| method | BLEU-1 | BLEU-2 | CIDEr-D | exact | label acc. |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m, res in r["results"].items():
            v = res[part]
            lines.append(f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in metrics) + " |")
        lines.append("")
    methods = list(r["results"])
    lines += ["### Summary (best CIDEr-D per source)", ""]
    for part in ("emoji", "fashion_mnist", "photos", "macro"):
        ranked = sorted(methods, key=lambda m: -r["results"][m][part]["cider_d"])
        lines.append(f"* {part}: " + ", ".join(f"{m} {r['results'][m][part]['cider_d']:.3f}" for m in ranked[:3]))
    gen = [m for m in methods if m.startswith("generative")]
    base = [m for m in methods if m not in gen]
    verdicts = []
    for part in ("emoji", "fashion_mnist", "photos"):
        g = max(gen, key=lambda m: r["results"][m][part]["cider_d"])
        b = max(base, key=lambda m: r["results"][m][part]["cider_d"])
        gv, bv = r["results"][g][part]["cider_d"], r["results"][b][part]["cider_d"]
        verdicts.append(f"{part}: {'beats' if gv > bv else 'does NOT beat'} the best baseline ({g} {gv:.3f} vs "
                        f"{b} {bv:.3f})")
    lines += ["", "Verdict, by CIDEr-D: the generative captioner " + "; ".join(verdicts) + ". Fashion-MNIST's "
              "classes are training classes (only the images are new), the emoji test names are never seen, and "
              "15 photos are too few to separate methods reliably."]
    lines += ["", "### The 15 sample photos", "", "| photo | subject | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for row in r["photo_captions"]:
        lines.append(f"| {row['photo']} | {row['subject']} | " + " | ".join(row[m] for m in methods) + " |")
    lines += ["", "### Emoji examples (first 8 of the test split)", "",
              "| reference | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, ref in enumerate(r["emoji_references"]):
        lines.append(f"| {ref} | " + " | ".join(r["examples"][m]["emoji"][i] for m in methods) + " |")
    lines += ["", f"Decoding time (PyTorch, {r['torch_threads']} thread, all {sum(src.values())} items): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in r["decode_seconds"].items())
              + f". Memory from pixels vs from cached embeddings: max abs diff "
                f"{r['memory_max_abs_diff_cached_vs_pixels']:.1e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgemm" / "captioner"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "captioner-study"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result = run(args.cache)
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
