"""Token generation for encoder–decoder captioners, in numpy: greedy, beam search, sampling, streaming.

The decoder is one ONNX graph run one step at a time (token ids and the
self-attention past in; next-token logits and the present out); the image's
cross-attention keys and values are computed once by the image graph and fed to
every step unchanged. This module holds everything between those graph calls.

Greedy and beam search reproduce transformers' ``generate()`` (5.x) step for
step, so that an exported captioner gives *the same token ids* as its PyTorch
model: the logits processors run in transformers' order (repetition penalty,
no-repeat n-gram, minimum lengths, suppressed tokens), greedy picks from the
processed logits, and beam search processes log-probabilities and keeps
transformers' top-2k candidates, length penalty, early stopping and
improvement heuristic. Sampling (temperature, top-k, top-p) follows the same
warpers with numpy's random generator, so it is reproducible with a seed but not
bit-identical to torch's.

Finished sequences leave the batch: a row whose caption ended (greedy), or an
image whose beams can no longer improve, is dropped from the cache, so a batch
costs what its unfinished captions cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.errors import BundleError, InputError

_NEG = np.float32(-1.0e9)  # transformers' "impossible" score for beams and finished hypotheses


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode; the defaults are transformers' ``GenerationConfig`` defaults.

    Lengths count tokens after the decoder prompt (start ids and any text prompt)
    except ``min_length``, which, as in transformers, counts the whole decoder sequence.
    """

    max_new_tokens: int | None = None  # generated tokens at most (the end token included); None: max_length rules
    max_length: int = 20  # the whole decoder sequence at most (prompt included), when max_new_tokens is None
    min_new_tokens: int = 0  # the end token is banned until this many tokens were generated
    min_length: int = 0  # ... until the decoder sequence (prompt included) is this long
    num_beams: int = 1  # 1: greedy (or sampling); more: beam search
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated_length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (heuristic) or "never"
    no_repeat_ngram_size: int = 0  # > 0: an n-gram of this size never appears twice
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL's penalty)
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated as the first new token
    do_sample: bool = False  # sample instead of taking the best token (greedy) or the best beams
    temperature: float = 1.0  # sampling: logits are divided by this
    top_k: int = 50  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set of tokens whose probability reaches p
    seed: int | None = None  # sampling: random seed, for reproducible samples

    def __post_init__(self):
        def positive_int(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"{name} must be an integer ≥ {low}, got {value!r}.")

        if self.max_new_tokens is not None:
            positive_int("max_new_tokens", 1)
        positive_int("max_length", 1)
        positive_int("num_beams", 1)
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            positive_int(name, 0)
        for name, low_open in (("length_penalty", None), ("repetition_penalty", 0.0), ("temperature", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or (
                    low_open is not None and value <= low_open):
                bound = "" if low_open is None else f" > {low_open:g}"
                raise InputError(f"{name} must be a finite number{bound}, got {value!r}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
        if self.early_stopping not in (True, False, "never"):
            raise InputError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer or None, got {self.seed!r}.")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(
                    isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in value):
                raise InputError(f"{name} must be a list of token ids, got {value!r}.")
            object.__setattr__(self, name, tuple(int(t) for t in value))

    def updated(self, **changes: Any) -> GenerationSettings:
        """These settings with some replaced (``None`` values are ignored)."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown generation settings {unknown}; known: {sorted(self.__dataclass_fields__)}.")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Hypothesis:
    """One generated sequence."""

    tokens: list[int]  # the whole decoder sequence: prompt ids, then the generated ids (the end token included)
    score: float  # sum of the chosen tokens' log-probabilities / generated_length ** length_penalty
    prompt_length: int  # how many of ``tokens`` are the decoder prompt


@dataclass(frozen=True)
class DecoderGraph:
    """The names that tie the decoder-step graph to the loop (from the manifest's ``generation`` entry)."""

    input_ids: str  # decoder input: token ids (batch, new tokens)
    logits: str  # decoder output: next-token logits of the last position (batch, vocab)
    cache: Mapping[str, str]  # past input → the present output that feeds it at the next step
    memory: tuple[str, ...]  # decoder inputs the image graph produces (cross-attention keys and values)


class CachedDecoder:
    """The decoder graph with its self-attention cache, advanced one call at a time.

    The present outputs of one call are the past inputs of the next as they are
    (ONNX Runtime reads numpy inputs in place), so the cache is copied only where
    the graph concatenates the new position, and when rows are selected.

    Args:
        backend: The opened decoder-step graph.
        graph: Its tensor names.
        memory: The image graph's outputs the decoder reads, one row per sequence.
    """

    def __init__(self, backend: Backend, graph: DecoderGraph, memory: Mapping[str, np.ndarray]):
        self.backend, self.graph = backend, graph
        specs = {t.name: t for t in backend.inputs}
        missing = [n for n in (graph.input_ids, *graph.cache, *graph.memory) if n not in specs]
        if missing:
            raise BundleError(f"the decoder graph has no inputs {missing}; the manifest's generation entry does "
                              "not match it. Re-export the bundle.")
        self.memory = {name: memory[name] for name in graph.memory}
        rows = len(next(iter(self.memory.values())))
        self.past = {}
        for name in graph.cache:
            shape = specs[name].shape  # (batch, heads, past, head_dim), heads and head_dim fixed
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise BundleError(f"decoder input {name!r} has shape {shape}; a past must be "
                                  "(batch, heads, past, head_dim) with fixed heads and head_dim.")
            self.past[name] = np.zeros((rows, shape[1], 0, shape[3]), np.dtype(specs[name].dtype))
        self.length = 0  # positions in the cache

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Feed (rows, n) new token ids; returns the next-token logits (rows, vocab) as float32."""
        out = self.backend.infer({self.graph.input_ids: input_ids, **self.past, **self.memory})
        self.past = {past: out[present] for past, present in self.graph.cache.items()}
        self.length += input_ids.shape[1]
        return np.asarray(out[self.graph.logits], np.float32)

    def select(self, rows: np.ndarray, *, memory: bool = True) -> None:
        """Keep (and reorder, or repeat) cache rows; ``memory=False`` leaves the image rows as they are (beams
        of one image share them)."""
        self.past = {name: value[rows] for name, value in self.past.items()}
        if memory:
            self.memory = {name: value[rows] for name, value in self.memory.items()}


class DeviceCachedDecoder(CachedDecoder):
    """A :class:`CachedDecoder` whose cache and memory stay on the backend's device between steps.

    On a GPU, feeding numpy would copy the whole cache to the GPU and the present
    back at every step; bound on the device, each present stays where it was
    computed and is the next past. Only the logits come back. Selecting rows (a
    finished caption leaving, beams reordering at every step) runs on the device
    too (``backend.take_rows``). On the CPU this bought nothing (207 ms vs 217 ms
    for 20 tokens of a 6-layer decoder: ONNX Runtime already reads numpy inputs
    in place), so it is used for GPU backends only.

    Args:
        backend: A backend with ``run_bound``, ``to_device`` and ``take_rows`` (ONNX Runtime, TensorRT).
        graph: The decoder graph's names.
        memory: The image graph's outputs, numpy.
        device: Where the cache lives (default: the backend's device).
    """

    def __init__(self, backend: Backend, graph: DecoderGraph, memory: Mapping[str, np.ndarray],
                 device: str | None = None):
        super().__init__(backend, graph, memory)
        self.device = device or backend.device
        self.memory = {k: backend.to_device(v, self.device) for k, v in self.memory.items()}
        self.past = {k: backend.to_device(v, self.device) for k, v in self.past.items()}

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.backend.run_bound({self.graph.input_ids: np.ascontiguousarray(input_ids, np.int64), **self.past,
                                      **self.memory}, keep=set(self.graph.cache.values()), device=self.device)
        self.past = {past: out[present] for past, present in self.graph.cache.items()}
        self.length += input_ids.shape[1]
        return np.asarray(out[self.graph.logits], np.float32)

    def select(self, rows: np.ndarray, *, memory: bool = True) -> None:
        self.past = {k: self.backend.take_rows(v, rows) for k, v in self.past.items()}
        if memory:
            self.memory = {k: self.backend.take_rows(v, rows) for k, v in self.memory.items()}


def open_decoder(backend: Backend, graph: DecoderGraph, memory: Mapping[str, np.ndarray]) -> CachedDecoder:
    """The cached decoder for this backend: the cache on the device for GPU providers, numpy otherwise."""
    if getattr(backend, "device", "cpu") != "cpu" and hasattr(backend, "take_rows"):
        return DeviceCachedDecoder(backend, graph, memory)
    return CachedDecoder(backend, graph, memory)


# -- logits processors, in transformers' order ----------------------------------------


def _process(scores: np.ndarray, seqs: np.ndarray, s: GenerationSettings, prompt_length: int,
             eos: np.ndarray) -> np.ndarray:
    """transformers' logits processors on (rows, vocab) scores, given each row's sequence so far (rows, length)."""
    length = seqs.shape[1]
    if s.repetition_penalty != 1.0:
        seen = np.take_along_axis(scores, seqs, axis=1)
        penalised = np.where(seen < 0, seen * np.float32(s.repetition_penalty), seen / np.float32(s.repetition_penalty))
        np.put_along_axis(scores, seqs, penalised.astype(np.float32), axis=1)
    n = s.no_repeat_ngram_size
    if n and length >= n:
        if n == 1:
            banned = seqs
            np.put_along_axis(scores, banned, -np.inf, axis=1)
        else:
            windows = np.lib.stride_tricks.sliding_window_view(seqs, n, axis=1)  # (rows, length - n + 1, n)
            prefix = seqs[:, length + 1 - n:]
            matches = (windows[:, :, :-1] == prefix[:, None, :]).all(axis=2)
            rows, cols = np.nonzero(matches)
            scores[rows, windows[rows, cols, -1]] = -np.inf
    if (s.min_length and length < s.min_length) or (s.min_new_tokens and length - prompt_length < s.min_new_tokens):
        scores[:, eos] = -np.inf
    if s.suppress_tokens:
        scores[:, list(s.suppress_tokens)] = -np.inf
    if s.begin_suppress_tokens and length == prompt_length:
        scores[:, list(s.begin_suppress_tokens)] = -np.inf
    return scores


def _warp(scores: np.ndarray, s: GenerationSettings, keep: int = 1) -> np.ndarray:
    """transformers' sampling warpers: temperature, top-k, top-p (``keep``: tokens never filtered)."""
    if s.temperature != 1.0:
        scores = scores / np.float32(s.temperature)
    if s.top_k:
        k = min(max(s.top_k, keep), scores.shape[1])
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1: k]
        scores = np.where(scores < kth, -np.inf, scores).astype(np.float32)
    if s.top_p < 1.0:
        order = np.argsort(scores, axis=1, kind="stable")  # ascending
        ranked = np.take_along_axis(scores, order, axis=1)
        cumulative = np.cumsum(_softmax(ranked), axis=1)
        remove = cumulative <= 1 - s.top_p
        remove[:, -keep:] = False
        drop = np.zeros_like(remove)
        np.put_along_axis(drop, order, remove, axis=1)
        scores = np.where(drop, -np.inf, scores).astype(np.float32)
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, largest first (ties: lower index first)."""
    if k < values.shape[1]:
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    picked = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    return np.take_along_axis(part, order, axis=1)


# -- the loops ---------------------------------------------------------------------------


@dataclass
class _Lengths:
    prompt: int
    max_length: int  # prompt + max_new_tokens


def _lengths(prompt: np.ndarray, s: GenerationSettings, max_positions: int) -> _Lengths:
    p = prompt.shape[1]
    if s.max_new_tokens is None and s.max_length <= p:
        raise InputError(f"max_length={s.max_length} leaves no room after a decoder prompt of {p} tokens; "
                         "pass max_new_tokens instead.")
    total = p + s.max_new_tokens if s.max_new_tokens is not None else s.max_length
    if total > max_positions:
        room = max_positions - p
        raise InputError(f"generating up to {total - p} tokens after a decoder prompt of {p} tokens needs "
                         f"{total} positions, but the decoder has {max_positions}; "
                         + (f"ask for at most max_new_tokens={room}." if room > 0 else "shorten the prompt."))
    return _Lengths(p, total)


def stream_greedy(decoder: CachedDecoder, prompt: np.ndarray, s: GenerationSettings, eos_ids: Sequence[int],
                  max_positions: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Greedy decoding (or sampling with ``s.do_sample``), one step at a time.

    Args:
        decoder: The decoder with the memory of ``len(prompt)`` images and an empty cache.
        prompt: int64 (rows, prompt length): the decoder prompt of every row.
        s: Settings (``num_beams`` is ignored).
        eos_ids: End tokens; a row that produces one is finished.
        max_positions: The decoder's position limit.

    Yields:
        ``(rows, tokens)`` after each step: the rows (indices into ``prompt``) that
        produced a token, and those tokens. A row's last token is an end token or
        its ``max_new_tokens``-th.

    Returns:
        Through ``StopIteration.value``: one :class:`Hypothesis` per row.
    """
    lengths = _lengths(prompt, s, max_positions)
    eos = np.asarray(list(eos_ids), np.int64)
    rng = np.random.default_rng(s.seed) if s.do_sample else None
    seqs = [list(map(int, row)) for row in prompt]
    logp = np.zeros(len(prompt), np.float64)
    active = np.arange(len(prompt))
    feed = np.ascontiguousarray(prompt, np.int64)
    while len(active):
        logits = decoder.step(feed)
        current = np.asarray([seqs[r] for r in active], np.int64)
        scores = _process(logits, current, s, lengths.prompt, eos)
        if rng is not None:
            warped = _warp(scores, s)
            probs = _softmax(warped.astype(np.float64))
            tokens = np.asarray([rng.choice(len(p), p=p) for p in probs], np.int64)
        else:
            tokens = np.argmax(scores, axis=1)
        chosen = _log_softmax(scores)[np.arange(len(active)), tokens]
        logp[active] += np.where(np.isfinite(chosen), chosen, -1e9)
        for r, t in zip(active, tokens):
            seqs[r].append(int(t))
        yield active.copy(), tokens.copy()
        done = np.isin(tokens, eos) | (len(current[0]) + 1 >= lengths.max_length)
        if done.all():
            break
        if done.any():
            keep = np.flatnonzero(~done)
            decoder.select(keep)
            active, tokens = active[keep], tokens[keep]
        feed = tokens[:, None].astype(np.int64)
    return [Hypothesis(seq, float(logp[i] / max(len(seq) - lengths.prompt, 1) ** s.length_penalty), lengths.prompt)
            for i, seq in enumerate(seqs)]


def greedy(decoder: CachedDecoder, prompt: np.ndarray, s: GenerationSettings, eos_ids: Sequence[int],
           max_positions: int) -> list[Hypothesis]:
    """Greedy decoding (or sampling) to the end; see :func:`stream_greedy`."""
    steps = stream_greedy(decoder, prompt, s, eos_ids, max_positions)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@dataclass
class _Beams:
    """transformers' beam-search state for the images still searching (arrays over (images, beams, …))."""

    running: np.ndarray  # (B, nb, max_length) token ids of the running beams
    running_scores: np.ndarray  # (B, nb) their summed log-probabilities
    finished: np.ndarray  # (B, nb, max_length) the best finished hypotheses so far
    finished_scores: np.ndarray  # (B, nb) their length-penalised scores (-1e9: an empty slot)
    is_finished: np.ndarray  # (B, nb) whether a slot holds a finished hypothesis
    improvable: np.ndarray  # (B, 1) whether the running beams may still beat the finished ones
    images: np.ndarray  # (B,) index of each image in the batch


def beam_search(decoder: CachedDecoder, prompt: np.ndarray, s: GenerationSettings, eos_ids: Sequence[int],
                pad_id: int, max_positions: int) -> list[Hypothesis]:
    """Beam search as transformers' ``generate(num_beams=…)`` does it.

    Args:
        decoder: The decoder with the memory of ``len(prompt)`` images (one row each) and an empty cache.
        prompt: int64 (images, prompt length).
        s: Settings; ``num_beams`` beams per image.
        eos_ids: End tokens.
        pad_id: Fills unused positions (as transformers does; never returned).
        max_positions: The decoder's position limit.

    Returns:
        The best hypothesis of each image.
    """
    nb, lengths = s.num_beams, _lengths(prompt, s, max_positions)
    eos = np.asarray(list(eos_ids), np.int64)
    rng = np.random.default_rng(s.seed) if s.do_sample else None
    n_images, p, max_len = len(prompt), lengths.prompt, lengths.max_length
    keep_k = max(2, 1 + len(eos)) * nb
    top_nb = np.arange(keep_k) < nb
    fill = pad_id if pad_id else (int(eos[0]) if len(eos) else -1)  # transformers' `pad or eos` fill value
    running = np.full((n_images, nb, max_len), fill, np.int64)
    running[:, :, :p] = prompt[:, None, :]
    state = _Beams(running=running, running_scores=np.zeros((n_images, nb), np.float32),
                   finished=running.copy(), finished_scores=np.full((n_images, nb), _NEG, np.float32),
                   is_finished=np.zeros((n_images, nb), bool), improvable=np.ones((n_images, 1), bool),
                   images=np.arange(n_images))
    state.running_scores[:, 1:] = _NEG
    results: dict[int, Hypothesis] = {}

    # The first step is the same for every beam of an image: run it once per image, then copy.
    logits = np.repeat(decoder.step(np.ascontiguousarray(prompt, np.int64)), nb, axis=0)
    decoder.select(np.repeat(np.arange(n_images), nb))
    cur = p
    while True:
        b = len(state.images)
        flat = state.running[:, :, :cur].reshape(b * nb, cur)
        scores = _process(_log_softmax(logits), flat, s, p, eos)
        if rng is not None:
            scores = _warp(scores, s, keep=len(eos) + 1)
        vocab = scores.shape[1]
        total = (scores.reshape(b, nb, vocab) + state.running_scores[:, :, None]).reshape(b, nb * vocab)
        if rng is not None:
            picks = np.stack([rng.choice(nb * vocab, size=keep_k, replace=False, p=pr)
                              for pr in _softmax(total.astype(np.float64))])
            picks = np.take_along_axis(picks, _top(np.take_along_axis(total, picks, axis=1), keep_k), axis=1)
        else:
            picks = _top(total, keep_k)
        top_scores = np.take_along_axis(total, picks, axis=1)  # (b, K)
        parent, token = picks // vocab, picks % vocab
        candidates = np.take_along_axis(state.running, parent[:, :, None], axis=1)  # (b, K, max_len)
        candidates[:, :, cur] = token
        hits = np.isin(token, eos) | (cur + 1 >= max_len)

        # the best unfinished candidates run on
        live_scores = (top_scores + hits.astype(np.float32) * _NEG).astype(np.float32)
        nxt = _top(live_scores, nb)
        state.running = np.take_along_axis(candidates, nxt[:, :, None], axis=1)
        state.running_scores = np.take_along_axis(live_scores, nxt, axis=1)
        beam_parent = np.take_along_axis(parent, nxt, axis=1)  # (b, nb) which running beam each continues

        # finished candidates among the top nb join the finished hypotheses if they are better
        just = hits & top_nb[None, :]
        done_scores = (top_scores / np.float32((cur + 1 - p) ** s.length_penalty)).astype(np.float32)
        full = state.is_finished.all(axis=1, keepdims=True) & (s.early_stopping is True)
        done_scores = done_scores + full * _NEG + (~state.improvable) * _NEG + (~just) * _NEG
        merged_scores = np.concatenate([state.finished_scores, done_scores.astype(np.float32)], axis=1)
        best = _top(merged_scores, nb)
        state.finished = np.take_along_axis(np.concatenate([state.finished, candidates], axis=1),
                                            best[:, :, None], axis=1)
        state.finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        state.is_finished = np.take_along_axis(np.concatenate([state.is_finished, just], axis=1), best, axis=1)
        cur += 1

        # can the running beams still beat the worst finished hypothesis?
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_length = max_len - p
        else:
            best_length = cur - p
        best_running = state.running_scores[:, :1] / np.float32(best_length ** s.length_penalty)
        worst = np.where(state.is_finished, state.finished_scores.min(axis=1, keepdims=True), _NEG)
        state.improvable &= (best_running > worst).any(axis=1, keepdims=True)

        searching = state.improvable[:, 0] & ~(state.is_finished.all(axis=1) & (s.early_stopping is True))
        if hits.all():
            searching[:] = False
        for i in np.flatnonzero(~searching):
            results[int(state.images[i])] = _hypothesis(state.finished[i, 0], state.finished_scores[i, 0], p, eos)
        if not searching.any():
            break
        rows = (np.arange(b)[:, None] * nb + beam_parent).reshape(-1)
        if not searching.all():
            keep = np.flatnonzero(searching)
            state = _Beams(state.running[keep], state.running_scores[keep], state.finished[keep],
                           state.finished_scores[keep], state.is_finished[keep], state.improvable[keep],
                           state.images[keep])
            rows = rows.reshape(b, nb)[keep].reshape(-1)
            decoder.select(rows)
        else:
            decoder.select(rows, memory=False)
        logits = decoder.step(state.running[:, :, cur - 1].reshape(-1, 1))
    return [results[i] for i in range(n_images)]


def _hypothesis(tokens: np.ndarray, score: float, prompt_length: int, eos: np.ndarray) -> Hypothesis:
    generated = tokens[prompt_length:]
    ends = np.flatnonzero(np.isin(generated, eos))
    length = prompt_length + (int(ends[0]) + 1 if len(ends) else len(generated))
    return Hypothesis([int(t) for t in tokens[:length]], float(score), prompt_length)


def generate(decoder: CachedDecoder, prompt: np.ndarray, s: GenerationSettings, eos_ids: Sequence[int],
             pad_id: int, max_positions: int) -> list[Hypothesis]:
    """Greedy decoding, sampling or beam search, as ``s`` says; one hypothesis per prompt row."""
    if s.num_beams > 1:
        return beam_search(decoder, prompt, s, eos_ids, pad_id, max_positions)
    return greedy(decoder, prompt, s, eos_ids, max_positions)


class GenerationGraphs:
    """A captioner's two graphs and its manifest ``generation`` entry: pixels (and prompt ids) → hypotheses.

    Args:
        encoder: The image graph (pixels → the memory the decoder reads).
        decoder: The decoder-step graph.
        spec: The manifest's ``generation`` entry (a :class:`~edgemm.runtime.manifest.Generation`).
    """

    def __init__(self, encoder: Backend, decoder: Backend, spec: Any, question: Backend | None = None):
        self.encoder, self.decoder_backend, self.spec, self.question = encoder, decoder, spec, question
        self.graph = DecoderGraph(spec.input_ids, spec.logits, dict(spec.cache), tuple(spec.memory))
        self.pixels_input = encoder.inputs[0].name
        if (question is None) != (spec.question_graph is None):
            raise BundleError("the manifest's generation.question_graph and the graphs given disagree.")

    def memory(self, pixels: np.ndarray, question: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the image graph (and, for question answering, the question graph): the decoder's memory per image.

        Args:
            pixels: Preprocessed images.
            question: VQA: the question's ``input_ids`` and ``attention_mask``, one row per image.
        """
        out = self.encoder.infer({self.pixels_input: pixels})
        if self.question is not None:
            if question is None:
                raise InputError("this model answers questions: pass a question.")
            names = {t.name for t in self.question.inputs}
            out = self.question.infer({**{k: v for k, v in out.items() if k in names}, **question})
        return {name: out[name] for name in self.graph.memory}

    def prompt(self, rows: int, prompt_ids: Sequence[int] = ()) -> np.ndarray:
        """The decoder prompt of ``rows`` sequences: the start ids, then ``prompt_ids``."""
        return np.tile(np.asarray([*self.spec.start_ids, *prompt_ids], np.int64), (rows, 1))

    def generate(self, pixels: np.ndarray, settings: GenerationSettings, prompt_ids: Sequence[int] = (),
                 question: Mapping[str, np.ndarray] | None = None) -> list[Hypothesis]:
        """Caption (or answer about) a batch of preprocessed images: one hypothesis each."""
        return self.decode(self.memory(pixels, question), settings, prompt_ids)

    def decode(self, memory: Mapping[str, np.ndarray], settings: GenerationSettings,
               prompt_ids: Sequence[int] = ()) -> list[Hypothesis]:
        """Decode from memory :meth:`memory` made (or rows of it): one hypothesis per row.

        A camera stream runs the image graph on every frame and decodes only the
        frames whose scene changed.
        """
        rows = len(next(iter(memory.values())))
        decoder = open_decoder(self.decoder_backend, self.graph, memory)
        return generate(decoder, self.prompt(rows, prompt_ids), settings, self.spec.eos_ids,
                        self.spec.pad_id, self.spec.max_positions)

    def stream(self, pixels: np.ndarray, settings: GenerationSettings, prompt_ids: Sequence[int] = (),
               question: Mapping[str, np.ndarray] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Greedy decoding (or sampling) step by step; see :func:`stream_greedy`."""
        decoder = open_decoder(self.decoder_backend, self.graph, self.memory(pixels, question))
        return stream_greedy(decoder, self.prompt(len(pixels), prompt_ids), settings, self.spec.eos_ids,
                             self.spec.max_positions)
