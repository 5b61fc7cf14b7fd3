"""The numpy generation loop's pieces against transformers' own logits processors, and the device cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edgemm
from edgemm.runtime import generation as gen
from edgemm.runtime.datasets import sample_photos
from edgemm.runtime.errors import InputError

VOCAB = 300


def _case(seed: int, rows: int = 4, length: int = 9):
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
    seqs = rng.integers(0, 12, (rows, length)).astype(np.int64)  # few distinct ids: n-grams repeat
    return scores, seqs


@pytest.mark.parametrize("seed", range(5))
def test_processors_equal_transformers(seed):
    from transformers.generation.logits_process import (LogitsProcessorList, MinLengthLogitsProcessor,
                                                        MinNewTokensLengthLogitsProcessor,
                                                        NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        SuppressTokensAtBeginLogitsProcessor,
                                                        SuppressTokensLogitsProcessor)

    scores, seqs = _case(seed)
    s = gen.GenerationSettings(repetition_penalty=1.7, no_repeat_ngram_size=2 + seed % 2, min_length=12,
                               min_new_tokens=3, suppress_tokens=(5, 7), begin_suppress_tokens=(9,))
    prompt = seqs.shape[1] if seed % 2 else 2  # begin-suppression applies when nothing was generated yet
    ours = gen._process(scores.copy(), seqs, s, prompt, np.asarray([3]))
    theirs = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.7), NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size),
        MinLengthLogitsProcessor(12, 3), MinNewTokensLengthLogitsProcessor(prompt, 3, 3),
        SuppressTokensLogitsProcessor([5, 7]), SuppressTokensAtBeginLogitsProcessor([9], prompt),
    ])(torch.from_numpy(seqs), torch.from_numpy(scores.copy())).numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    assert np.allclose(np.where(np.isinf(ours), 0, ours), np.where(np.isinf(theirs), 0, theirs), atol=1e-6)
    assert np.isinf(ours).any()  # the case bans something


@pytest.mark.parametrize("seed", range(4))
def test_warpers_keep_what_transformers_keeps(seed):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    scores, _ = _case(seed)
    s = gen.GenerationSettings(do_sample=True, temperature=0.7, top_k=20 + seed, top_p=0.8)
    ours = gen._warp(scores.copy(), s)
    theirs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20 + seed), TopPLogitsWarper(0.8)])(
        None, torch.from_numpy(scores.copy())).numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    assert np.allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], atol=1e-5)


def test_top_sorts_like_topk_and_breaks_ties_by_index():
    values = np.asarray([[0.1, 0.9, 0.9, -1.0, 0.5]], np.float32)
    assert gen._top(values, 3).tolist() == [[1, 2, 4]]
    assert gen._top(values, 5).tolist() == [[1, 2, 4, 0, 3]]


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(num_beams=-1), dict(length_penalty=float("nan")),
                                    dict(repetition_penalty=0.0), dict(top_k=-1), dict(top_p=1.5), dict(seed=-2),
                                    dict(suppress_tokens=[1, "a"]), dict(do_sample="yes")])
def test_settings_are_checked(kwargs):
    with pytest.raises(InputError):
        gen.GenerationSettings(**kwargs)


def test_device_cache_gives_the_same_tokens(tiny_blip_bundle):
    """The I/O-bound decoder GPU providers use, here bound to the CPU: the same captions as numpy feeds."""
    model = edgemm.load(tiny_blip_bundle, threads=1)
    g = model.graphs
    pixels = model.preprocess([p.image for p in sample_photos()[:5]], color="rgb")
    for s in (gen.GenerationSettings(max_new_tokens=12), gen.GenerationSettings(max_new_tokens=12, num_beams=3)):
        plain = gen.generate(gen.CachedDecoder(g.decoder_backend, g.graph, g.memory(pixels)), g.prompt(5), s,
                             g.spec.eos_ids, g.spec.pad_id, g.spec.max_positions)
        bound = gen.generate(gen.DeviceCachedDecoder(g.decoder_backend, g.graph, g.memory(pixels), device="cpu"),
                             g.prompt(5), s, g.spec.eos_ids, g.spec.pad_id, g.spec.max_positions)
        assert [h.tokens for h in plain] == [h.tokens for h in bound]
        assert len({len(h.tokens) for h in plain}) > 1  # rows left the batch on the way
    assert isinstance(gen.open_decoder(g.decoder_backend, g.graph, g.memory(pixels[:1])), gen.CachedDecoder)
    assert not isinstance(gen.open_decoder(g.decoder_backend, g.graph, g.memory(pixels[:1])),
                          gen.DeviceCachedDecoder)  # numpy feeds on the CPU, as measured faster


def test_the_committed_gather_graphs_are_the_scripts(tmp_path):
    """runtime/data/gather_rows.*.onnx (the device-side row selection) are what scripts/make_gather_graphs.py writes."""
    import runpy

    from edgemm.runtime.backends import onnxruntime as ort_backend

    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "make_gather_graphs.py"))
    for dtype in script["DTYPES"]:
        committed = (ort_backend._GATHER_GRAPHS / f"gather_rows.{dtype}.onnx").read_bytes()
        assert committed == script["gather_graph"](dtype).SerializeToString()


def test_rows_are_taken_where_the_cache_lives(tiny_blip_bundle):
    model = edgemm.load(tiny_blip_bundle, threads=1)
    backend = model.decoder_backend
    for dtype in (np.float32, np.float16):
        cache = np.arange(3 * 2 * 4 * 5, dtype=dtype).reshape(3, 2, 4, 5)
        taken = backend.take_rows(backend.to_device(cache, "cpu"), np.array([2, 0, 0]))
        assert taken.device_name() == "cpu" and np.array_equal(taken.numpy(), cache[[2, 0, 0]])
    empty = backend.take_rows(backend.to_device(np.zeros((2, 2, 0, 5), np.float32), "cpu"), np.array([1]))
    assert empty.numpy().shape == (1, 2, 0, 5)
