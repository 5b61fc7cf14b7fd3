"""Tokenization from the bundle's tokenizer.json matches the reference tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from edgemm.runtime.datasets import SAMPLE_SENTENCES
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.text import TextTokenizer


@pytest.fixture(scope="module")
def tok(default_bundle):
    return TextTokenizer(default_bundle / "tokenizer.json", max_length=256, pad_id=0)


def test_matches_transformers_tokenizer(tok):
    from transformers import AutoTokenizer

    from edgemm.export.models.text import minilm_dir

    ref = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = list(SAMPLE_SENTENCES) + ["Ünïcödé, emoji 🚀 and UPPER case", "x " * 400]
    ours = tok(texts)
    theirs = ref(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_ids"].shape[1] == 256  # the long text was truncated


@pytest.mark.parametrize(("texts", "message"), [
    ([], "no texts"),
    ("a single string", "wrap it in a list"),
    (["ok", 3], "text 1 is int"),
])
def test_bad_texts(tok, texts, message):
    with pytest.raises(InputError, match=message):
        tok(texts)


def test_malformed_tokenizer_file(tmp_path):
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    with pytest.raises(BundleError, match="could not be loaded"):
        TextTokenizer(f, max_length=8, pad_id=0)


def test_max_length_padding_gives_fixed_width():
    from edgemm.export.models.text import minilm_dir

    fixed = TextTokenizer(minilm_dir() / "tokenizer.json", max_length=24, pad_id=0, padding="max_length")
    out = fixed(["hi", "a somewhat longer sentence than the first"])
    assert out["input_ids"].shape == (2, 24)
    assert out["attention_mask"][0].sum() == 3 and (out["input_ids"][0, 3:] == 0).all()
    with pytest.raises(BundleError, match="unknown text padding"):
        TextTokenizer(minilm_dir() / "tokenizer.json", max_length=24, pad_id=0, padding="left")
