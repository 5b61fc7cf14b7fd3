"""The fusion model: a dual encoder whose image and text features also feed a trained fusion head.

    >>> model = edgemm.load(default="matching")
    >>> model.match(frame, "a red fire engine")            # probability the text describes the frame
    >>> index.search(model.embed_texts([q]), k=5, rerank=50, reranker=model.reranker([q]))

The head sees what the towers output (embeddings, and for cross-attention
heads the image patch grid and text token states); the manifest's ``fusion``
entry says which graph output feeds which head input, so the runtime holds no
tensor names of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgemm._index import Hit
from edgemm._model import FAMILIES, DualEncoder, Prediction, _check_positive_int, _is_batch
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.manifest import TOKENS

FEATURE_ROLES = ("image_encoder", "text_encoder", TOKENS)  # what a fusion head may read
Reranker = Callable[[int, np.ndarray, Sequence[Hit]], np.ndarray]


def _check_texts(texts: Any, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(f"{name} must be a string or a list of strings, got {type(texts).__name__}.") from None
    if not texts:
        raise InputError(f"{name} is empty; pass at least one text.")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"{name}[{i}] must be a non-blank string, got {t!r}.")
    return texts


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class FusionModel(DualEncoder):
    """Image + text → a decision: a match probability, or class probabilities.

    Everything :class:`DualEncoder` does (embed, classify, search) plus the
    fusion head: :meth:`match`, :meth:`predict` and :meth:`reranker`.

    Args:
        bundle: An opened bundle of family ``fusion``.
        backend: Backend name (``"onnxruntime"``).
        providers: Execution providers for ONNX Runtime, e.g. ``("cpu",)`` or ``("cuda",)``.
        threads: Intra-op threads per graph; ``None`` uses every core.
        spinning: Whether ONNX Runtime's idle threads spin after a run (``None``: off).
    """

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime",
                 providers: Sequence[str] = ("cpu",), threads: int | None = None, spinning: bool | None = None):
        super().__init__(bundle, backend=backend, providers=providers, threads=threads, spinning=spinning)
        f = self.manifest.fusion
        if f is None or "fusion" not in self.manifest.graphs:
            raise BundleError(f"bundle '{bundle.path}' has no fusion graph or fusion entry; it is not a fusion bundle.")
        self.fusion = f
        self.fusion_backend = self._open(bundle, "fusion", backend)  # its sources were checked with each graph
        self._sources = {name: tuple(source.split("/")) for name, source in f.inputs.items()}
        strays = sorted(s for s, (role, _) in self._sources.items() if role not in FEATURE_ROLES)
        if strays:
            raise BundleError(f"bundle '{bundle.path}': fusion inputs {strays} read graphs a fusion head cannot see "
                              f"(it sees {', '.join(FEATURE_ROLES)}).")
        missing = {t.name for t in self.fusion_backend.inputs} - set(self._sources)
        if missing:
            raise BundleError(f"bundle '{bundle.path}': the fusion graph's inputs {sorted(missing)} have no source.")
        self.classes: tuple[str, ...] = bundle.read_labels(f.labels, "fusion.labels") if f.labels else ()
        width = self.fusion_backend.outputs[0].shape[-1]
        if self.classes and isinstance(width, int) and width != len(self.classes):
            raise BundleError(f"bundle '{bundle.path}': fusion.labels names {len(self.classes)} classes, but the "
                              f"fusion graph outputs {width} logits. Re-export the bundle.")
        # A head that reads only the image embedding can rerank from an index's stored vectors.
        self.image_only_embedding = {o for r, o in self._sources.values() if r == "image_encoder"} == {"embedding"}

    def __repr__(self) -> str:
        return (f"FusionModel({str(self.bundle.path)!r}, task={self.fusion.task!r}, "
                f"architecture={self.fusion.architecture!r})")

    # -- features -----------------------------------------------------------------

    def text_features(self, texts: Sequence[str], *, batch_size: int = 64) -> dict[str, np.ndarray]:
        """The text graph's outputs and the attention mask, all texts padded to the longest."""
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(texts), batch_size):
            feeds = self.tokenizer(texts[start : start + batch_size])
            out = self.text_backend.infer({name: feeds[name] for name in self._text_inputs})
            out["attention_mask"] = feeds["attention_mask"]
            parts.append(out)
        longest = max(p["attention_mask"].shape[1] for p in parts)
        merged = {}
        for name in parts[0]:
            arrays = []
            for p in parts:
                a = p[name]
                if a.ndim >= 2 and a.shape[1] == p["attention_mask"].shape[1] and a.shape[1] < longest:
                    pad = [(0, 0)] * a.ndim
                    pad[1] = (0, longest - a.shape[1])
                    a = np.pad(a, pad)  # zero states and mask 0: the head masks them out
                arrays.append(a)
            merged[name] = np.concatenate(arrays)
        return merged

    def _fuse(self, image: dict[str, np.ndarray], text: dict[str, np.ndarray], image_rows: np.ndarray,
              text_rows: np.ndarray, batch_size: int) -> np.ndarray:
        sides = {"image_encoder": (image, image_rows), "text_encoder": (text, text_rows), TOKENS: (text, text_rows)}
        parts = []
        for start in range(0, len(image_rows), batch_size):
            feeds = {}
            for name, (role, output) in self._sources.items():
                arrays, rows = sides[role]
                feeds[name] = arrays[output][rows[start : start + batch_size]]
            parts.append(self.fusion_backend.infer(feeds)[self.fusion_backend.outputs[0].name])
        return np.concatenate(parts)

    def _pairs(self, images: Any, texts: Any) -> tuple[list[Any], list[str], np.ndarray, np.ndarray, bool]:
        single = not _is_batch(images) and isinstance(texts, str)
        images = list(images) if _is_batch(images) else [images]
        texts = _check_texts(texts)
        if len(images) != len(texts) and 1 not in (len(images), len(texts)):
            raise InputError(f"{len(images)} images and {len(texts)} texts: pass as many of each (pairs), "
                             "or one image with many texts, or many images with one text.")
        n = max(len(images), len(texts))
        rows_i = np.zeros(n, np.intp) if len(images) == 1 else np.arange(n)
        rows_t = np.zeros(n, np.intp) if len(texts) == 1 else np.arange(n)
        return images, texts, rows_i, rows_t, single

    # -- the head -----------------------------------------------------------------

    def match(self, images: Any, texts: str | Sequence[str], *, color: str = "bgr",
              batch_size: int = 32) -> float | np.ndarray:
        """How likely each text describes its image (matching heads).

        Args:
            images: One image or a list (frames, PIL images, paths, as :meth:`classify` takes).
            texts: One text or a list: pairs with the images, or broadcast when one side has one item.
            color: Channel order of 3/4-channel arrays.
            batch_size: Images (and pairs) per graph call.

        Returns:
            A probability in [0, 1] for one pair, else a float32 array, one per pair.
            ``manifest.fusion.threshold`` is the decision threshold picked at training.

        Raises:
            InputError: Bad images or texts, mismatched counts, or a classification head.
        """
        if self.fusion.task != "matching":
            raise InputError(f"this fusion head classifies into {len(self.classes)} classes; use predict().")
        batch_size = _check_positive_int(batch_size, "batch_size")
        images, texts, rows_i, rows_t, single = self._pairs(images, texts)
        logits = self._fuse(self._run_images(images, color, batch_size), self.text_features(texts),
                            rows_i, rows_t, batch_size)[:, 0]
        p = _sigmoid(logits.astype(np.float64)).astype(np.float32)
        return float(p[0]) if single else p

    def predict(self, images: Any, texts: str | Sequence[str], *, top_k: int = 5, color: str = "bgr",
                batch_size: int = 32) -> list[Prediction] | list[list[Prediction]]:
        """Class predictions of (image, text) pairs (classification heads).

        Returns:
            For one pair, its top-k predictions best first; for several, one list per pair.

        Raises:
            InputError: Bad images or texts, mismatched counts, or a matching head.
        """
        if self.fusion.task != "classification":
            raise InputError("this fusion head scores image-text matches; use match().")
        top_k = _check_positive_int(top_k, "top_k")
        batch_size = _check_positive_int(batch_size, "batch_size")
        images, texts, rows_i, rows_t, single = self._pairs(images, texts)
        logits = self._fuse(self._run_images(images, color, batch_size), self.text_features(texts),
                            rows_i, rows_t, batch_size).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, len(self.classes))
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = [[Prediction(self.classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, best)]
        return out[0] if single else out

    def reranker(self, texts: str | Sequence[str], *, color: str = "bgr") -> Reranker:
        """A reranker for ``VectorIndex.search(..., rerank=k, reranker=...)`` with these query texts.

        A head over embeddings reranks from the stored vectors alone; a head
        that needs image tokens re-reads each candidate image from its
        metadata's ``"path"`` (as ``edgemm index add`` stores it).

        The new hit scores are the match probabilities, unless the bundle sets
        ``fusion.rerank_cosine_weight`` w (the built-in matching model does,
        picked on validation): then they are head logit + w × the search's
        cosine, a ranking score that keeps what the vector search knew. Use
        :meth:`match` for calibrated probabilities.

        Raises:
            InputError: Not a matching head, or bad texts.
        """
        if self.fusion.task != "matching":
            raise InputError("reranking needs a matching head; this one classifies.")
        texts = _check_texts(texts)
        text = self.text_features(texts)
        embedding = self.manifest.graphs["image_encoder"].outputs[0].name
        weight = self.fusion.rerank_cosine_weight

        def score(query: int, vectors: np.ndarray, hits: Sequence[Hit]) -> np.ndarray:
            if not 0 <= query < len(texts):
                raise InputError(f"the reranker was made for {len(texts)} query texts; query {query} has none.")
            if self.image_only_embedding:
                image = {embedding: vectors.astype(np.float32, copy=False)}
            else:
                paths = [(h.metadata or {}).get("path") for h in hits]
                if any(p is None for p in paths):
                    raise InputError("this head needs the candidate images; index them with metadata {'path': ...} "
                                     "(edgemm index add does) to rerank.")
                image = self._run_images(paths, color, 32)
            rows_t = np.full(len(hits), query, np.intp)
            logits = self._fuse(image, text, np.arange(len(hits)), rows_t, 64)[:, 0].astype(np.float64)
            if weight:
                return logits + weight * np.array([h.score for h in hits], np.float64)
            return _sigmoid(logits)

        return score

    def _exercise(self, images: list[np.ndarray]) -> None:
        from edgemm.runtime.datasets import SAMPLE_SENTENCES

        super()._exercise(images)
        texts = list(SAMPLE_SENTENCES[: len(images)])
        if self.fusion.task == "matching":
            self.match(images, texts, color="rgb")
        else:
            self.predict(images, texts, color="rgb")


FAMILIES["fusion"] = FusionModel
