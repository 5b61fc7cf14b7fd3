"""Text tokenization from a bundle's ``tokenizer.json`` with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.limits import LIMITS


def load_tokenizer(path: str | Path):
    """A bundle's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, size-bounded (``edgemm.limits``).

    Raises:
        BundleError: Too large or malformed.
    """
    from tokenizers import Tokenizer

    size = Path(path).stat().st_size
    if size > LIMITS.max_tokenizer_bytes:
        raise BundleError(f"tokenizer '{path}' is {size} bytes, more than {LIMITS.max_tokenizer_bytes}; "
                          f"{LIMITS.hint('max_tokenizer_bytes')}.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise BundleError(f"tokenizer '{path}' could not be loaded: {e}") from e


class TextTokenizer:
    """Batch tokenizer producing the text graph's ``input_ids`` and ``attention_mask``.

    Args:
        path: A Hugging Face ``tokenizer.json``.
        max_length: Longer texts are truncated to this many tokens.
        pad_id: Padding id.
        padding: ``"longest"`` pads a batch to its longest text; ``"max_length"``
            always to ``max_length`` (models trained on fixed-length text, e.g. SigLIP).
    """

    def __init__(self, path: str | Path, *, max_length: int, pad_id: int, padding: str = "longest"):
        if padding not in ("longest", "max_length"):
            raise BundleError(f"unknown text padding {padding!r}; this runtime knows 'longest' and 'max_length'.")
        self._tok = load_tokenizer(path)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.max_length = max_length
        self.pad_id = pad_id
        self.padding = padding

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize a batch.

        Raises:
            InputError: An empty batch, or an item that is not a string or holds a lone surrogate.
        """
        if isinstance(texts, str):
            raise InputError("expected a list of texts, got a single string; wrap it in a list.")
        if len(texts) == 0:
            raise InputError("no texts given; pass at least one text.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is {type(t).__name__}, not a string.")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # tokenizers would raise a bare TypeError
                raise InputError(f"text {i} ({t!r}) holds a lone surrogate, not valid Unicode; decode bytes with "
                                 "errors='replace' (or fix the file's encoding) first.") from None
        encodings = self._tok.encode_batch(list(texts))
        length = self.max_length if self.padding == "max_length" else max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), length), self.pad_id, np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}
