"""Which fusion head to ship for image–text matching, measured on the packaged emoji.

The task: does this text describe this image? Each of the ~1,240 single-codepoint
emoji drawn from ``fonts-noto-color-emoji`` is an image whose Unicode name is its
true caption. Every head is trained on frozen features of the default towers
(EfficientNet-Lite0 ConSE image embedding and 7x7 patch grid, all-MiniLM-L6-v2
sentence embedding and token states) and compared with the dual encoder's
cosine alone.

* Split: emoji by index, shuffled with a fixed seed, 70% train / 10% validation
  / 20% test. Names never cross splits; negatives come from the same split.
* Prompt: the name alone or "an emoji of {name}", whichever ranks the validation
  names better by the dual encoder's cosine; the heads get the same texts.
* Hard negatives, mined by the dual encoder: a wrong name with a high cosine to
  the image. Taking each image's top-ranked wrong names lets a head score well
  from the text alone ("hub" names that are close to many images are nearly
  always negatives), which this script measures as the *mining check*. So
  negatives are drawn as whole permutations instead: the assignment of wrong
  names to images with the highest total cosine (solved exactly), then the
  next-highest excluding pairs already used, plus random permutations. Every
  image and every name is then a negative equally often, and nothing but the
  pair can tell a match. The mix (hard, random per image) is picked on the
  validation split.
* Metrics on the test split: (a) pair accuracy on one positive and one hard
  negative per image (the hardest permutation; the threshold is the best one on
  the validation split); (b) ranking the true name among all test names,
  recall@1/@5, either reranking the dual encoder's top 20 by the head or
  scoring every test name with the head. Heads' CPU latency is ONNX Runtime
  with 2 threads on the exported graph.
* The winner has the best test pair accuracy; heads within one standard error
  of it tie, and the tie goes to the better rank-all recall@1. The best head
  that reads nothing but the two 384-d embeddings (what a vector index keeps,
  so the only kind usable to rerank a search) is named too.

Usage:
    python benchmarks/fusion_study.py [--cache ~/.cache/edgemm/fusion-study]
                                      [--out benchmarks/results/fusion-study] [--threads 2]
                                      [--mix HARD RANDOM]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemm.export.fusion_train import Example, TrainOptions, cache_features, train_head
from edgemm.export.models.dual_encoder import default_towers
from edgemm.export.models.fusion import FusionConfig, FusionHead, fusion_spec
from edgemm.export.models.matching import (SEED, balanced_pairs, evaluate, head_scorer, ranking, split_rows,
                                           training_data)
from edgemm.export.onnx_export import export_onnx
from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemm.runtime.datasets import emoji

from _common import device_info, limit_native_threads  # shared helpers beside this script

PROMPTS = ("{}", "an emoji of {}")
# Negatives per image (hard, random) tried for training; the study keeps the mix whose
# "early + pooled patches" head does best on the validation split.
MIXES = ((2, 4), (1, 8))
RERANK_K = 20  # the dual encoder's shortlist the heads rerank
EMBEDDING_OPTIONS = TrainOptions(epochs=40, batch_size=64, lr=1e-3, weight_decay=1e-2, patience=6, seed=SEED)
# Cross-attention is trained from scratch: at 1e-3 it stayed at chance, so a lower rate.
ATTENTION_OPTIONS = TrainOptions(epochs=15, batch_size=64, lr=3e-4, weight_decay=1e-2, patience=4, seed=SEED)


@dataclass(frozen=True)
class Variant:
    name: str  # the row's name
    config: FusionConfig  # the head
    options: TrainOptions  # how it is trained
    embedding_only: bool  # reads only image_embedding + text_embedding (all a vector index keeps)


VARIANTS = (
    Variant("early (embeddings only)", FusionConfig.default("early"), EMBEDDING_OPTIONS, True),
    Variant("early + pooled patches", FusionConfig.default("early", pooled_image_tokens=True), EMBEDDING_OPTIONS,
            False),
    Variant("late (embeddings only)", FusionConfig.default("late"), EMBEDDING_OPTIONS, True),
    Variant("gated (embeddings only)", FusionConfig.default("gated"), EMBEDDING_OPTIONS, True),
    Variant("gated + pooled patches", FusionConfig.default("gated", pooled_image_tokens=True), EMBEDDING_OPTIONS,
            False),
    Variant("cross-attention", FusionConfig.default("cross_attention", hidden=128), ATTENTION_OPTIONS, False),
    Variant("cross-attention + tanh gate", FusionConfig.default("cross_attention", hidden=128, tanh_gate=True),
            ATTENTION_OPTIONS, False),
)

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image rows, text rows) → score per pair


# --------------------------------------------------------------------------- data and mining


def top_ranked_pairs(rows: np.ndarray, sim: np.ndarray, hard: int, random: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The naive mining: each image's top-ranked wrong names plus random ones (for the mining check)."""
    s = sim[np.ix_(rows, rows)].copy()
    np.fill_diagonal(s, -np.inf)
    ranked = np.argsort(-s, axis=1)
    images, texts, labels = [], [], []
    for i, image in enumerate(rows):
        wrong = np.r_[ranked[i, :hard], rng.choice(ranked[i, hard:-1], random, replace=False)]
        images += [image] * (1 + len(wrong))
        texts += [image, *rows[wrong]]
        labels += [1] + [0] * len(wrong)
    return np.array(images), np.array(texts), np.array(labels, np.int64)


# --------------------------------------------------------------------------- metrics


def gather(features: dict[str, np.ndarray], names: tuple[str, ...], images: np.ndarray,
           texts: np.ndarray) -> dict[str, np.ndarray]:
    """Graph feeds for pairs: image features by image row, text features by text row, trimmed padding."""
    out = {}
    for n in names:
        out[n] = features[n][images if n.startswith("image") else texts]
    if "text_mask" in out:
        length = int(out["text_mask"].sum(1).max())
        out["text_mask"] = np.ascontiguousarray(out["text_mask"][:, :length])
        out["text_tokens"] = np.ascontiguousarray(out["text_tokens"][:, :length])
    return out


def onnx_latency(head: FusionHead, features: dict[str, np.ndarray], test: np.ndarray, sim: np.ndarray,
                 threads: int, folder: Path) -> dict[str, float]:
    """Median ms for one pair and for one image with its 20 shortlisted names, plus the export's max abs diff."""
    spec = fusion_spec(head.config)
    path = export_onnx(head, spec, folder / f"{head.config.architecture}-{id(head)}.onnx")
    backend = OnnxRuntimeBackend(path, providers=("cpu",), threads=threads)
    image = test[0]
    shortlist = test[np.argsort(-sim[image, test])[:RERANK_K]]
    out: dict[str, float] = {}
    worst = 0.0
    for label, images, texts in (("ms_per_pair", np.array([image]), np.array([image])),
                                 (f"ms_per_{RERANK_K}_pairs", np.full(RERANK_K, image), shortlist)):
        feeds = gather(features, tuple(t.name for t in spec.inputs), images, texts)
        got = backend.infer(feeds)["logits"]
        with torch.no_grad():
            ref = head(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
        worst = max(worst, float(np.abs(got - ref).max()))
        for _ in range(5):
            backend.infer(feeds)
        times = []
        start = time.perf_counter()
        while len(times) < 50 or time.perf_counter() - start < 0.5:
            t0 = time.perf_counter()
            backend.infer(feeds)
            times.append(time.perf_counter() - t0)
        out[label] = 1000 * float(np.median(times))
    out["onnx_max_abs_diff"] = worst
    return out


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def pick(rows: list[dict[str, Any]], test_pairs: int) -> dict[str, Any]:
    """Best test pair accuracy; heads within one standard error of it tie, and the tie goes to rank-all recall@1."""
    best = max(r["pair_accuracy"] for r in rows)
    tied = [r for r in rows if best - r["pair_accuracy"] <= stderr(best, test_pairs)]
    return max(tied, key=lambda r: (r["rank_all"]["r1"], r["pair_accuracy"]))


# --------------------------------------------------------------------------- the study


def features_for(prompt: str, pairs: list[tuple[str, np.ndarray]], towers: Any, cache: Path) -> dict[str, np.ndarray]:
    examples = [Example(rgb, prompt.format(name), name) for name, rgb in pairs]
    done = {"last": 0.0}

    def progress(n: int, total: int) -> None:
        if time.perf_counter() - done["last"] > 5 or n == total:
            done["last"] = time.perf_counter()
            print(f"  features {n}/{total}", flush=True)

    return cache_features(towers, examples, cache, progress)


def run(cache: Path, threads: int, mixes: tuple[tuple[int, int], ...] = MIXES) -> dict[str, Any]:
    t_start = time.perf_counter()
    pairs = emoji()
    names = [n for n, _ in pairs]
    splits = split_rows(len(pairs))
    print(f"{len(pairs)} emoji: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)

    towers = default_towers()
    t0 = time.perf_counter()
    by_prompt = {p: features_for(p, pairs, towers, cache) for p in PROMPTS}
    feature_seconds = time.perf_counter() - t0
    prompts = {}
    for p, f in by_prompt.items():
        sim = f["image_embedding"] @ f["text_embedding"].T
        cosine = lambda i, t, sim=sim: sim[i, t]  # noqa: E731
        prompts[p] = {"val_rank_all": ranking(cosine, splits["val"], sim, None),
                      "test_rank_all": ranking(cosine, splits["test"], sim, None)}
    prompt = max(PROMPTS, key=lambda p: (prompts[p]["val_rank_all"]["r1"], prompts[p]["val_rank_all"]["r5"]))
    features = {**{k: v for k, v in by_prompt[PROMPTS[0]].items() if k.startswith("image")},
                **{k: v for k, v in by_prompt[prompt].items() if k.startswith("text")}}
    del by_prompt
    sim = features["image_embedding"] @ features["text_embedding"].T
    print(f"prompt {prompt!r} (validation recall@1 by cosine: "
          + ", ".join(f"{p!r} {v['val_rank_all']['r1']:.1%}" for p, v in prompts.items()) + ")", flush=True)

    balanced = balanced_pairs(splits, sim)

    probe = next(v for v in VARIANTS if v.name == "early + pooled patches")
    mix_results = []
    for hard, random in mixes:
        data = training_data(splits, sim, hard, random)
        if len(mixes) > 1:
            head, _ = train_head(probe.config, features, data["targets"], probe.options, pairs=data["pairs"],
                                 validation=data["validation"])
            m = evaluate(head_scorer(head, features), splits, sim, balanced, RERANK_K)
            mix_results.append({"hard": hard, "random": random, "val_pair_accuracy": m["val_pair_accuracy"],
                                "val_rank_all_r1": m["val_rank_all"]["r1"]})
            print(f"negatives {hard} hard + {random} random: validation pair accuracy "
                  f"{m['val_pair_accuracy']:.1%}, recall@1 {m['val_rank_all']['r1']:.1%}", flush=True)
    if mix_results:
        best = max(mix_results, key=lambda m: (m["val_pair_accuracy"], m["val_rank_all_r1"]))
        hard, random = best["hard"], best["random"]
    else:
        hard, random = mixes[0]
    data = training_data(splits, sim, hard, random)

    baseline = evaluate(lambda i, t: sim[i, t], splits, sim, balanced, RERANK_K)
    print(f"dual encoder cosine: pair accuracy {baseline['pair_accuracy']:.1%}, "
          f"rank-all recall@1 {baseline['rank_all']['r1']:.1%}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            head, report = train_head(variant.config, features, data["targets"], variant.options,
                                      pairs=data["pairs"], validation=data["validation"])
            train_seconds = time.perf_counter() - t0
            metrics = evaluate(head_scorer(head, features), splits, sim, balanced, RERANK_K)
            latency = onnx_latency(head, features, splits["test"], sim, threads, Path(tmp))
            rows.append({"name": variant.name, "config": variant.config.to_dict(), "options": asdict(variant.options),
                         "embedding_only": variant.embedding_only, "inputs": list(head.input_names),
                         "parameters": sum(p.numel() for p in head.parameters()), "train_seconds": train_seconds,
                         "epochs_run": report.epochs_run, "best_epoch": report.best_epoch, **metrics, **latency})
            print(f"{variant.name}: pair accuracy {metrics['pair_accuracy']:.1%}, rerank@{RERANK_K} recall@1 "
                  f"{metrics['rerank']['r1']:.1%}, rank-all recall@1 {metrics['rank_all']['r1']:.1%}, "
                  f"{train_seconds:.0f} s, {latency['ms_per_pair']:.3f} ms/pair", flush=True)

    # The mining check: late fusion cannot see the pair, so any skill it shows comes from one side alone.
    rng = np.random.default_rng(SEED + 1)  # balanced_pairs' generator, which its hard-only mining leaves unused
    naive_train = top_ranked_pairs(splits["train"], sim, hard, random, rng)
    naive_val = top_ranked_pairs(splits["val"], sim, hard, random, rng)
    late = next(v for v in VARIANTS if v.config.architecture == "late")
    head, _ = train_head(late.config, features, np.r_[naive_train[2], naive_val[2]], late.options,
                         pairs=(np.r_[naive_train[0], naive_val[0]], np.r_[naive_train[1], naive_val[1]]),
                         validation=np.r_[np.zeros(len(naive_train[2]), bool), np.ones(len(naive_val[2]), bool)])
    naive_balanced = {s: top_ranked_pairs(splits[s], sim, 1, 0, rng) for s in ("val", "test")}
    check = {
        "late_on_top_ranked_negatives": evaluate(head_scorer(head, features), splits, sim, naive_balanced, RERANK_K)
        ["pair_accuracy"],
        "cosine_on_top_ranked_negatives": evaluate(lambda i, t: sim[i, t], splits, sim, naive_balanced, RERANK_K)
        ["pair_accuracy"],
        "late_on_permutation_negatives": next(r for r in rows if r["name"] == late.name)["pair_accuracy"],
    }

    test_pairs = len(balanced["test"][2])
    winner = pick(rows, test_pairs)
    embedding_winner = pick([r for r in rows if r["embedding_only"]], test_pairs)
    return {
        "task": "image-text matching on emoji (Unicode names as captions)",
        "emoji": len(pairs), "split": {k: len(v) for k, v in splits.items()}, "seed": SEED,
        "names_sample": names[:3],
        "prompt": prompt, "prompts": prompts,
        "training_pairs": data["train_pairs"], "validation_pairs": data["val_pairs"],
        "negatives_per_image": {"hard": hard, "random": random}, "negative_mixes": mix_results,
        "test_pairs": int(len(balanced["test"][2])), "rerank_k": RERANK_K,
        "feature_seconds": feature_seconds,
        "baseline": baseline, "heads": rows, "mining_check": check,
        "winner": winner["name"], "embedding_only_winner": embedding_winner["name"],
        "seconds": time.perf_counter() - t_start,
        "device": device_info(threads),
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(r: dict[str, Any]) -> str:
    b = r["baseline"]
    n_test = r["split"]["test"]
    n_pairs = r["test_pairs"]
    lines = [
        "## Fusion head study: image–text matching on emoji",
        "",
        f"Does this text describe this image? {r['emoji']} emoji drawn from `fonts-noto-color-emoji`, each captioned "
        f"by its Unicode name, split by emoji {r['split']['train']} train / {r['split']['val']} validation / "
        f"{n_test} test (seed {r['seed']}). Heads are trained on frozen features of the default towers "
        "(EfficientNet-Lite0 ConSE embedding and 7x7x1280 patch grid; all-MiniLM-L6-v2 embedding and token "
        f"states). Texts use the prompt `{r['prompt']}`, the better of "
        + ", ".join(f"`{p}` (validation recall@1 {pct(v['val_rank_all']['r1'])}%)" for p, v in r["prompts"].items())
        + " for the dual encoder.",
        "",
        f"Training pairs: per image its own name and {r['negatives_per_image']['hard']} hard + "
        f"{r['negatives_per_image']['random']} random wrong names from the same split ({r['training_pairs']} "
        f"pairs; {r['validation_pairs']} validation pairs for early stopping). Hard negatives are the dual "
        "encoder's: whole permutations of the names maximising the total cosine, so every name is a negative as "
        "often as every image (see the mining check below).",
        "",
        f"Test metrics ({n_test} images): **pair accuracy** on {n_pairs} pairs, each image with its name and its "
        "hardest-permutation wrong name, threshold chosen on the validation split (one standard error: "
        f"±{pct(stderr(0.6, n_pairs))} points); **rerank@{r['rerank_k']}**: recall of the true name after the "
        f"head reorders the dual encoder's top {r['rerank_k']} of the {n_test} test names; **rank all**: the head "
        f"scores all {n_test} names (±{pct(stderr(0.15, n_test))} points at 15%). Latency: the exported ONNX graph "
        "on ONNX Runtime, CPU, "
        f"{r['device']['threads']} threads ({r['device']['cpu_model']}), median of ≥ 50 calls.",
        "",
        "| head | inputs | pair acc % | rerank@20 R@1 | R@5 | rank-all R@1 | R@5 | val rank-all R@1 | params | "
        "train s | epochs (best) | ms / pair | ms / 20 pairs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dual encoder cosine (baseline) | 2 embeddings | {pct(b['pair_accuracy'])} | {pct(b['rerank']['r1'])} | "
        f"{pct(b['rerank']['r5'])} | {pct(b['rank_all']['r1'])} | {pct(b['rank_all']['r5'])} | "
        f"{pct(b['val_rank_all']['r1'])} | – | – | – | – | – |",
    ]
    short = {"image_embedding": "img emb", "image_tokens": "patches", "text_embedding": "txt emb",
             "text_tokens": "txt tokens", "text_mask": "mask"}
    for h in r["heads"]:
        name = f"**{h['name']}**" if h["name"] == r["winner"] else h["name"]
        lines.append(
            f"| {name} | {' + '.join(short[i] for i in h['inputs'])} | {pct(h['pair_accuracy'])} | "
            f"{pct(h['rerank']['r1'])} | {pct(h['rerank']['r5'])} | {pct(h['rank_all']['r1'])} | "
            f"{pct(h['rank_all']['r5'])} | {pct(h['val_rank_all']['r1'])} | {h['parameters'] / 1e6:.2f} M | "
            f"{h['train_seconds']:.0f} | {h['epochs_run']} ({h['best_epoch']}) | {h['ms_per_pair']:.3f} | "
            f"{h['ms_per_20_pairs']:.3f} |")
    win = next(h for h in r["heads"] if h["name"] == r["winner"])
    emb = next(h for h in r["heads"] if h["name"] == r["embedding_only_winner"])
    late = next(h for h in r["heads"] if h["config"]["architecture"] == "late")
    attn = [h for h in r["heads"] if h["config"]["architecture"] == "cross_attention"]
    comparing = [h for h in r["heads"] if h["config"]["architecture"] != "late"]
    c = r["mining_check"]
    se = stderr(win["pair_accuracy"], n_pairs)
    lines += [
        "",
        f"Shortlist recall (the true name in the dual encoder's top {r['rerank_k']}): "
        f"{pct(b['rerank']['shortlist_recall'])}%, the ceiling of every rerank@{r['rerank_k']} figure. Every "
        f"exported head matched PyTorch to ≤ {max(h['onnx_max_abs_diff'] for h in r['heads']):.1e} on these pairs.",
    ]
    if r["negative_mixes"]:
        lines += ["", "Negative mix, chosen on the validation split with the \"early + pooled patches\" head: "
                  + "; ".join(f"{m['hard']} hard + {m['random']} random: pair accuracy {pct(m['val_pair_accuracy'])}%,"
                              f" recall@1 {pct(m['val_rank_all_r1'])}%" for m in r["negative_mixes"])
                  + f" → {r['negatives_per_image']['hard']} + {r['negatives_per_image']['random']}."]
    lines += [
        "",
        "### Choice",
        "",
        f"Rule: the best test pair accuracy; heads within one standard error of it (±{pct(se)} points) tie, and the "
        "tie goes to the better rank-all recall@1.",
        "",
        f"**Ship `{win['config']['architecture']}`"
        + (" with pooled patch tokens" if win["config"].get("pooled_image_tokens") else "")
        + f"** (row \"{win['name']}\"): held-out pair accuracy {pct(win['pair_accuracy'])}% against "
        f"{pct(b['pair_accuracy'])}% for the dual encoder's cosine; it ranks the true name first among all "
        f"{n_test} test names {pct(win['rank_all']['r1'])}% of the time against {pct(b['rank_all']['r1'])}% "
        f"(recall@5 {pct(win['rank_all']['r5'])}% against {pct(b['rank_all']['r5'])}%), at "
        f"{win['ms_per_pair']:.2f} ms per pair on the CPU.",
        "",
    ]
    if emb["rerank"]["r1"] > b["rerank"]["r1"] and emb["rank_all"]["r1"] > b["rank_all"]["r1"]:
        lines.append(
            f"Where only the stored 384-d embeddings exist (reranking a vector search), use \"{emb['name']}\": "
            f"pair accuracy {pct(emb['pair_accuracy'])}%, rerank@{r['rerank_k']} recall@1 {pct(emb['rerank']['r1'])}% "
            f"(cosine {pct(b['rerank']['r1'])}%).")
    else:
        lines.append(
            "Where only the stored 384-d embeddings exist (reranking a vector search), no head beats the cosine at "
            f"ranking here: the best embedding-only head, \"{emb['name']}\", reaches pair accuracy "
            f"{pct(emb['pair_accuracy'])}% (a calibrated yes/no, which the cosine cannot give) but recall@1 "
            f"{pct(emb['rerank']['r1'])}% after reranking the top {r['rerank_k']} and {pct(emb['rank_all']['r1'])}% "
            f"over all names, against the cosine's {pct(b['rerank']['r1'])}%. The ConSE image embedding (ImageNet "
            "class probabilities mapped to class-name text) carries too little about an emoji for a head to "
            "learn from; the patch grid does. So keep the cosine to order search results, and use an "
            "embedding-only head only to accept or reject them.")
    lines += [
        "",
        "### What the numbers say",
        "",
        f"* The cosine alone is at chance on hard pairs ({pct(b['pair_accuracy'])}%): its scale differs so much "
        "from image to image that no single threshold separates a name from the nearest wrong one. The heads that "
        f"compare the two sides reach {pct(min(h['pair_accuracy'] for h in comparing))}–"
        f"{pct(max(h['pair_accuracy'] for h in comparing))}%.",
        f"* Late fusion cannot model the pair: a sum of an image-only and a text-only score gives "
        f"{pct(late['pair_accuracy'])}% on pairs where each image and each name is once positive and once negative "
        "(chance is 50%). It suits tasks where each modality is evidence on its own, not matching.",
        f"* Mining check: with each image's top-ranked wrong names as negatives (and as test pairs), late fusion "
        f"scores {pct(c['late_on_top_ranked_negatives'])}% without ever comparing image and text (the cosine: "
        f"{pct(c['cosine_on_top_ranked_negatives'])}%). \"Hub\" names close to many images are almost always "
        "negatives there, so a text prior wins; that protocol measures the prior, not matching. The permutation "
        f"mining above removes it (late fusion: {pct(c['late_on_permutation_negatives'])}%).",
        f"* Reranking the dual encoder's top {r['rerank_k']} is capped by its shortlist recall "
        f"({pct(b['rerank']['shortlist_recall'])}%). The winner's recall@1 is {pct(win['rerank']['r1'])}% within "
        f"that shortlist but {pct(win['rank_all']['r1'])}% when it scores every name: it finds true names the "
        "cosine ranks low. Give it a longer shortlist (or all candidates when they are few) to get its gain.",
        f"* Cross-attention, trained from scratch on {r['split']['train']} images, overfits within a few epochs "
        "(best epochs " + ", ".join(f"{h['best_epoch']}" for h in attn) + "): pair accuracy "
        + ", ".join(f"{pct(h['pair_accuracy'])}% ({h['name']})" for h in attn)
        + ", rank-all recall@1 " + ", ".join(f"{pct(h['rank_all']['r1'])}%" for h in attn)
        + f", at {min(h['ms_per_pair'] for h in attn):.2f}+ ms per pair. It needs more pairs than this set has; "
        "the Flamingo tanh gate (a no-op at initialisation) does not change that.",
        "",
        f"Study time {r['seconds'] / 60:.1f} min on {r['device']['usable_cores']} cores, features "
        f"{r['feature_seconds']:.0f} s of it (tower features are cached; a first run computes them for "
        f"{r['emoji']} images and {2 * r['emoji']} texts, about a minute more on this machine). Reproduce: "
        "`python benchmarks/fusion_study.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgemm" / "fusion-study"),
                        help="feature cache folder (reused across runs)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fusion-study"),
                        help="output path without suffix; .md and .json are written")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--mix", nargs=2, type=int, metavar=("HARD", "RANDOM"),
                        help="train with this negative mix only (default: pick from %s on validation)" % (MIXES,))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit_native_threads(args.threads)
    report = run(Path(args.cache), args.threads, (tuple(args.mix),) if args.mix else MIXES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    for suffix, content in ((".json", json.dumps(report, indent=2)), (".md", text)):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out.with_suffix(suffix))
    print("\n" + text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
