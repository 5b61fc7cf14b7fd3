"""The captioner users hold: a sentence for a frame, batched, beamed, prompted or streamed.

    >>> model = edgemm.load("bundles/blip")            # or edgemm.load(default="captioner")
    >>> model.caption(frame).text
    'a forklift carrying boxes'
    >>> for piece in model.caption_stream(frame): print(piece, end="", flush=True)

The image graph runs once per image; the decoder-step graph runs once per
token with the self-attention cache carried between steps (runtime/generation.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemm._model import FAMILIES, _check_positive_int, _is_batch, open_graph
from edgemm.runtime.backends import Backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.generation import GenerationGraphs, GenerationSettings, Hypothesis
from edgemm.runtime.image import ImagePreprocessor
from edgemm.runtime.manifest import CAPTION_DECODER, CAPTION_ENCODER
from edgemm.runtime.text import load_tokenizer


@dataclass(frozen=True)
class Caption:
    """One image's caption."""

    text: str  # the decoded caption (special tokens and outer spaces dropped); with a prompt, it starts with it
    token_ids: list[int]  # what transformers' generate() returns: start ids, prompt ids, generated ids (end included)
    score: float  # length-normalised log-probability (transformers' sequences_scores for beam search)


class Captioner:
    """An image captioner loaded from a bundle of family ``captioner``.

    Args:
        bundle: An opened bundle.
        backend: Backend name (``"onnxruntime"``).
        providers: Execution providers for ONNX Runtime, e.g. ``("cpu",)`` or ``("cuda",)``.
        threads: Intra-op threads per graph; ``None`` uses every core.
        spinning: Whether ONNX Runtime's idle threads spin after a run (``None``: off, as for every family).

    Raises:
        BundleError: Not a captioner bundle, or its manifest does not match its graphs.
    """

    SPINNING: bool | None = False

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime",
                 providers: Sequence[str] = ("cpu",), threads: int | None = None, spinning: bool | None = None):
        m = bundle.manifest
        if m.generation is None or m.image is None:
            raise BundleError(f"bundle '{bundle.path}' has no generation entry or image preprocessing; it is not a "
                              "captioner.")
        self.bundle, self.manifest = bundle, m
        self._backend_options: dict[str, Any] = {"providers": tuple(providers), "threads": threads,
                                                 "spinning": self.SPINNING if spinning is None else spinning}
        self.encoder_backend = self._open(CAPTION_ENCODER, backend)
        self.decoder_backend = self._open(CAPTION_DECODER, backend)
        g = m.generation
        self.question_backend = self._open(g.question_graph, backend) if g.question_graph else None
        self.answers_questions = self.question_backend is not None
        self.graphs = GenerationGraphs(self.encoder_backend, self.decoder_backend, g, self.question_backend)
        self.preprocess = ImagePreprocessor(m.image)
        self.tokenizer = load_tokenizer(bundle.file(g.tokenizer))
        self.takes_prompt = g.prompt
        try:
            self.settings = GenerationSettings(**g.settings)
        except (TypeError, InputError) as e:
            raise BundleError(f"bundle '{bundle.path}': generation.settings {g.settings} are not valid ({e}). "
                              "Re-export the bundle.") from None
        vocab = next(t.shape[-1] for t in self.decoder_backend.outputs if t.name == g.logits)
        ids = [*g.start_ids, *g.eos_ids, *self.settings.suppress_tokens, *self.settings.begin_suppress_tokens]
        if isinstance(vocab, int) and max(ids) >= vocab:
            raise BundleError(f"bundle '{bundle.path}': generation names token id {max(ids)}, but the decoder "
                              f"scores only {vocab} tokens. Re-export the bundle.")

    def _open(self, role: str, backend: str) -> Backend:
        return open_graph(self.bundle, role, backend, self._backend_options)

    def __repr__(self) -> str:
        return f"Captioner({str(self.bundle.path)!r}, precision={self.manifest.precision!r})"

    # -- settings -------------------------------------------------------------------------

    def _settings(self, options: dict[str, Any]) -> GenerationSettings:
        """The bundle's decoding settings updated by the caller's (an unknown or bad one is an InputError)."""
        return self.settings.updated(**options)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if prompt is None:
            return []
        if not self.takes_prompt:
            raise InputError(f"this captioner ({self.manifest.name}) takes no prompt; call caption() without "
                             "prompt=.")
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}.")
        if not prompt.strip():
            raise InputError("prompt is empty or blank; pass text such as prompt='a picture of', or no prompt.")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"prompt {prompt!r} holds a lone surrogate, not valid Unicode.") from None
        return list(self.tokenizer.encode(prompt, add_special_tokens=False).ids)

    def _caption(self, h: Hypothesis) -> Caption:
        return Caption(self.tokenizer.decode(h.tokens, skip_special_tokens=True).strip(), h.tokens, h.score)

    # -- captioning -----------------------------------------------------------------------

    def caption(self, images: Any, *, prompt: str | None = None, max_new_tokens: int | None = None,
                num_beams: int | None = None, color: str = "bgr", batch_size: int = 8,
                **settings: Any) -> Caption | list[Caption]:
        """Caption a frame, or a list of frames.

        Args:
            images: One image (uint8 BGR HxWx3 frame by default, grayscale, BGRA, PIL
                image or file path) or a list of them.
            prompt: Text the caption continues ("a picture of"), for models that take one.
            max_new_tokens: Tokens to generate at most (the bundle's default when ``None``).
            num_beams: Beam search with this many beams; 1 is greedy decoding.
            color: Channel order of 3/4-channel arrays: ``"bgr"`` or ``"rgb"``.
            batch_size: Images decoded together.
            **settings: Other decoding settings (:class:`~edgemm.runtime.generation.GenerationSettings`):
                ``no_repeat_ngram_size``, ``repetition_penalty``, ``length_penalty``,
                ``early_stopping``, ``min_new_tokens``, ``do_sample``, ``temperature``,
                ``top_k``, ``top_p``, ``seed``.

        Returns:
            One :class:`Caption`, or a list for a list of images.

        Raises:
            InputError: A bad image, setting or prompt.
        """
        if self.answers_questions:
            raise InputError(f"this model ({self.manifest.name}) answers questions about images: call "
                             "answer(frame, question) instead of caption().")
        return self._generate(images, prompt_ids=self._prompt_ids(prompt), question=None, color=color,
                              batch_size=batch_size, settings={"max_new_tokens": max_new_tokens,
                                                               "num_beams": num_beams, **settings})

    def answer(self, images: Any, question: str, *, max_new_tokens: int | None = None, num_beams: int | None = None,
               color: str = "bgr", batch_size: int = 8, **settings: Any) -> Caption | list[Caption]:
        """Answer a question about a frame, or about each frame of a list (BLIP visual question answering).

        Args:
            images: One image or a list of them (as for :meth:`caption`).
            question: The question, e.g. ``"how many people are there?"``.
            max_new_tokens, num_beams, color, batch_size, **settings: As for :meth:`caption`.

        Returns:
            One :class:`Caption` (its ``text`` is the answer), or a list for a list of images.

        Raises:
            InputError: The model does not answer questions, a blank question, or a bad image or setting.
        """
        if not self.answers_questions:
            raise InputError(f"this model ({self.manifest.name}) captions images and answers no questions; call "
                             "caption(frame), or export a BlipForQuestionAnswering folder.")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question must be a non-blank string, got {question!r}.")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"question {question!r} holds a lone surrogate, not valid Unicode.") from None
        ids = list(self.tokenizer.encode(question).ids)  # with the tokenizer's own [CLS] … [SEP]
        if len(ids) > self.manifest.generation.max_positions:
            raise InputError(f"the question is {len(ids)} tokens long; the model reads at most "
                             f"{self.manifest.generation.max_positions}. Shorten it.")
        return self._generate(images, prompt_ids=[], question=ids, color=color, batch_size=batch_size,
                              settings={"max_new_tokens": max_new_tokens, "num_beams": num_beams, **settings})

    def _generate(self, images: Any, *, prompt_ids: list[int], question: list[int] | None, color: str,
                  batch_size: int, settings: dict[str, Any]) -> Caption | list[Caption]:
        s = self._settings(settings)
        batch_size = _check_positive_int(batch_size, "batch_size")
        single = not _is_batch(images)
        items = [images] if single else list(images)
        if not items:
            raise InputError("no images given; pass at least one image.")
        captions: list[Caption] = []
        for start in range(0, len(items), batch_size):
            pixels = self.preprocess(items[start: start + batch_size], color=color, first_index=start)
            feeds = _question_feeds(question, len(pixels)) if question is not None else None
            captions += [self._caption(h) for h in self.graphs.generate(pixels, s, prompt_ids, feeds)]
        return captions[0] if single else captions

    def caption_stream(self, image: Any, *, prompt: str | None = None, max_new_tokens: int | None = None,
                       color: str = "bgr", **settings: Any) -> Iterator[str]:
        """Caption one frame, yielding the text as it is decoded (for a live overlay).

        Pieces end at word boundaries, as transformers' ``TextStreamer`` prints
        them; joined, they are ``caption(image, ...).text``. Greedy decoding or
        sampling only: beam search decides its words at the end.

        Raises:
            InputError: A bad image, setting or prompt, a list of images, or ``num_beams`` > 1.
        """
        if self.answers_questions:
            raise InputError("caption_stream captions; this model answers questions: call answer(frame, question).")
        s = self._settings({"max_new_tokens": max_new_tokens, **settings})
        if s.num_beams > 1:
            raise InputError(f"caption_stream decodes greedily (or samples); beam search (num_beams={s.num_beams}) "
                             "settles its words only at the end: use caption(..., num_beams=...) instead.")
        if _is_batch(image):
            raise InputError("caption_stream takes one image; call it once per image, or caption() for a list.")
        prompt_ids = self._prompt_ids(prompt)
        pixels = self.preprocess([image], color=color)
        tokens = [*self.manifest.generation.start_ids, *prompt_ids]
        shown = 0
        for _rows, step in self.graphs.stream(pixels, s, prompt_ids):
            tokens.append(int(step[0]))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd"):  # a character split across byte-level tokens: wait for the rest
                continue
            cut = text.rfind(" ") + 1
            if cut > shown:
                yield text[shown:cut]
                shown = cut
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if len(text) > shown:
            yield text[shown:]

    def _exercise(self, images: list[np.ndarray]) -> None:
        """The calls a TensorRT engine is verified on: a batch greedily, one image with beams (RGB images)."""
        if self.answers_questions:
            self.answer(images, "what is in the picture?", max_new_tokens=8, color="rgb", batch_size=len(images))
            self.answer(images[:1], "what color is it?", max_new_tokens=8, num_beams=2, color="rgb")
            return
        self.caption(images, max_new_tokens=8, num_beams=1, color="rgb", batch_size=len(images))
        self.caption(images[:1], max_new_tokens=8, num_beams=2, color="rgb")


def _question_feeds(ids: list[int], rows: int) -> dict[str, np.ndarray]:
    """The question graph's token inputs: the same question for every image (transformers attends to all of it)."""
    tokens = np.tile(np.asarray(ids, np.int64), (rows, 1))
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}


FAMILIES["captioner"] = Captioner
