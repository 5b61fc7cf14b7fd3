"""Caption metrics in plain Python: corpus BLEU-1/2, CIDEr-D, exact match.

They follow the coco-caption evaluation code (``pycocoevalcap``, Chen et al.
2015), which is what captioning papers report, without its Java tokenizer:

* Tokenization (:func:`tokenize`) stands in for coco-caption's PTB tokenizer:
  lowercase, every character that is not a letter, digit, apostrophe or space
  becomes a space (so punctuation disappears and "t-shirt" is "t shirt"),
  then split on whitespace.
* BLEU (Papineni et al. 2002) is corpus-level: n-gram counts clipped by the
  maximum count in any one reference, summed over the corpus; the brevity
  penalty uses the reference length closest to each candidate (ties to the
  shorter one), summed over the corpus; BLEU-n is the geometric mean of the
  1..n precisions. coco-caption's ``Bleu`` scorer does the same ("closest").
* CIDEr-D (Vedantam et al. 2015) as coco-caption's ``CiderD``: n = 1..4,
  tf-idf vectors with document frequency counted over the evaluated set's
  references (one document per image), cosine-like similarity with
  candidate counts clipped by the reference counts, a Gaussian length penalty
  with sigma 6, averaged over references and n, times 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from edgemm.runtime.errors import InputError

_NON_WORD = re.compile(r"[^a-z0-9' ]+")
CIDER_SIGMA = 6.0  # coco-caption CiderD's length-penalty width
CIDER_N = 4


def tokenize(text: str) -> list[str]:
    """Lowercase, punctuation to spaces, whitespace split (a PTB-tokenizer stand-in; see the module docstring)."""
    return _NON_WORD.sub(" ", text.lower().replace("\u2019", "'")).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidate captions but {len(references)} reference lists; "
                         "pass one list of references per candidate.")
    if not candidates:
        raise InputError("no captions to score: pass at least one candidate with its references.")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise InputError(f"references[{i}] must be a non-empty list of strings, got {refs!r}.")


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 2) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` (Papineni et al.; coco-caption's ``Bleu`` with the "closest" reference length).

    Args:
        candidates: One generated caption per item.
        references: For each item, one or more reference captions.
        max_n: The highest n-gram order.

    Returns:
        ``{"bleu1": ..., ..., f"bleu{max_n}": ...}``, each in [0, 1].

    Raises:
        InputError: Lengths differ or an item has no references.
    """
    _check(candidates, references)
    matched, total = np.zeros(max_n), np.zeros(max_n)
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        rs = [tokenize(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(c, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)  # the maximum count of each n-gram in any one reference
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    # coco-caption adds a tiny epsilon so that a zero precision gives a score of ~0 rather than an error.
    tiny = 1e-9
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, tiny))
    out = {}
    for n in range(1, max_n + 1):
        logs = [math.log((matched[k] + tiny) / (total[k] + tiny)) for k in range(n)]
        out[f"bleu{n}"] = float(brevity * math.exp(sum(logs) / n))
    return out


def _tf(tokens: Sequence[str]) -> list[Counter]:
    return [_ngrams(tokens, n) for n in range(1, CIDER_N + 1)]


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, object]:
    """CIDEr-D (Vedantam et al.) as coco-caption's ``CiderD``: corpus score and one score per item.

    Document frequencies count, for each n-gram, the items whose references
    contain it (over this evaluated set); idf is ``log(N) - log(max(1, df))``.
    Each n-gram vector weights term frequency by idf; a candidate's counts are
    clipped by the reference's (``min`` in the dot product), the length
    penalty is ``exp(-(len_c - len_r)^2 / (2 * 6^2))``, and the score averages
    over references and n = 1..4, times 10.

    Args:
        candidates: One generated caption per item.
        references: For each item, one or more reference captions.

    Returns:
        ``{"cider_d": corpus mean, "per_item": [score, ...]}``.

    Raises:
        InputError: Lengths differ or an item has no references.
    """
    _check(candidates, references)
    refs_tf = [[_tf(tokenize(r)) for r in refs] for refs in references]
    df: list[Counter] = [Counter() for _ in range(CIDER_N)]
    for item in refs_tf:
        for n in range(CIDER_N):
            df[n].update(set().union(*(r[n].keys() for r in item)))
    log_n = math.log(float(len(references)))

    def vec(tf: list[Counter]) -> tuple[list[dict], list[float], int]:
        v, norms = [], []
        for n in range(CIDER_N):
            d = {g: k * (log_n - math.log(max(1.0, df[n][g]))) for g, k in tf[n].items()}
            v.append(d)
            norms.append(math.sqrt(sum(x * x for x in d.values())))
        # coco-caption measures length in bigrams (its ``if n == 1``); differences equal word-length ones.
        return v, norms, sum(tf[1].values())

    scores = []
    for cand, item in zip(candidates, refs_tf):
        vc, nc, lc = vec(_tf(tokenize(cand)))
        total = np.zeros(CIDER_N)
        for r in item:
            vr, nr, lr = vec(r)
            for n in range(CIDER_N):
                dot = sum(min(x, vr[n][g]) * vr[n][g] for g, x in vc[n].items() if g in vr[n])
                if nc[n] != 0 and nr[n] != 0:
                    dot /= nc[n] * nr[n]
                else:
                    dot = 0.0
                total[n] += dot * math.exp(-((lc - lr) ** 2) / (2 * CIDER_SIGMA**2))
        scores.append(float(total.mean() / len(item) * 10.0))
    return {"cider_d": float(np.mean(scores)), "per_item": scores}


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The share of candidates whose tokens equal those of one of their references."""
    _check(candidates, references)
    hits = [any(tokenize(c) == tokenize(r) for r in refs) for c, refs in zip(candidates, references)]
    return float(np.mean(hits))


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1, BLEU-2, CIDEr-D and exact match of one set of captions."""
    bleu = corpus_bleu(candidates, references, 2)
    return {**bleu, "cider_d": cider_d(candidates, references)["cider_d"],
            "exact_match": exact_match(candidates, references)}
