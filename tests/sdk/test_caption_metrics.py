"""Caption metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from edgemm._caption_metrics import caption_scores, cider_d, corpus_bleu, exact_match, tokenize
from edgemm.runtime.errors import InputError


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A T-shirt, folded.") == ["a", "t", "shirt", "folded"]
    assert tokenize("  Grace's  CAT!! ") == ["grace's", "cat"]


def test_identical_captions_score_one():
    cands = ["a tabby cat", "a cup of espresso"]
    s = caption_scores(cands, [[c] for c in cands])
    assert s["bleu1"] == pytest.approx(1.0) and s["bleu2"] == pytest.approx(1.0)
    assert s["exact_match"] == 1.0


def test_bleu_clips_counts_by_the_best_reference():
    # "the the the" vs "the cat": "the" counts at most once → unigram precision 1/3;
    # candidate length 3 > reference length 2, so no brevity penalty.
    assert corpus_bleu(["the the the"], [["the cat"]], 1)["bleu1"] == pytest.approx(1 / 3)


def test_corpus_bleu_by_hand():
    # Item 1: "a cat" vs "a cat": 2/2 unigrams, 1/1 bigrams.
    # Item 2: "a dog on a mat" vs {"a dog on the mat", "a dog"}: "a" twice but at most once in any reference →
    #   unigrams a, dog, on, mat = 4/5; bigrams "a dog", "dog on" of 4.
    # Corpus: p1 = 6/7, p2 = 3/5; lengths 7 vs closest references 2 + 5 = 7 → no brevity penalty.
    s = corpus_bleu(["a cat", "a dog on a mat"], [["a cat"], ["a dog on the mat", "a dog"]])
    assert s["bleu1"] == pytest.approx(6 / 7)
    assert s["bleu2"] == pytest.approx(math.sqrt(6 / 7 * 3 / 5))


def test_brevity_penalty_uses_the_closest_reference_length():
    # "a cat" (2 words) vs references of 4 and 7 words: the closest is 4 → BP = exp(1 - 4/2).
    s = corpus_bleu(["a cat"], [["a cat on mats", "a cat sitting on a red mat"]], 1)
    assert s["bleu1"] == pytest.approx(math.exp(1 - 4 / 2))


def test_cider_d_by_hand():
    # Two items, N = 2. "a" is in both items' references → idf 0; every other n-gram has df 1 → idf log 2.
    # Item 1, "a cat" vs "a cat": 1-grams {a: 0, cat: log2} identical → 1; 2-gram "a cat" → 1; no 3/4-grams → 0.
    #   Mean over n = 0.5, × 10 = 5.0.
    # Item 2, "a dog" vs "a cat": 1-grams share only "a" (weight 0) → 0; bigrams differ → 0. Score 0.
    out = cider_d(["a cat", "a dog"], [["a cat"], ["a bird"]])
    assert out["per_item"] == pytest.approx([5.0, 0.0])
    assert out["cider_d"] == pytest.approx(2.5)


def test_cider_d_length_penalty_and_clipping():
    # Item 1 "red red red car" vs "red car": the candidate's "red" tf (3·log2) is clipped to the reference's (log2).
    # 1-grams: vc = (3l, l), vr = (l, l) [l = log 2]; dot = min(3l, l)·l + l·l = 2l²; norms √10 l, √2 l
    #   → 2 / √20. 2-grams: vc {red red: 2l, red car: l}, vr {red car: l} → l² / (√5 l · l) = 1/√5.
    # Length (in bigrams, as coco-caption counts it): 3 vs 1 → penalty exp(-4 / 72).
    # Item 2 keeps "blue" in df so that no n-gram is in every item.
    out = cider_d(["red red red car", "blue"], [["red car"], ["blue"]])
    expected = (2 / math.sqrt(20) + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72) * 10
    assert out["per_item"][0] == pytest.approx(expected)
    assert out["per_item"][1] == pytest.approx(10 * 1 / 4)  # unigram only: a one-word caption has no bigrams


def test_exact_match_ignores_case_and_punctuation():
    assert exact_match(["A tabby cat.", "a dog"], [["a tabby cat"], ["a puppy", "the dog"]]) == 0.5


def test_mismatched_or_empty_references_are_refused():
    with pytest.raises(InputError, match="one list of references per candidate"):
        corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(InputError, match="non-empty list"):
        cider_d(["a"], ["a"])
    with pytest.raises(InputError, match="no captions"):
        exact_match([], [])
