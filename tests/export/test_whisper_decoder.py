"""The CTranslate2 reader and the Whisper tiny.en mapping, on the real packaged model.bin."""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from edgemm.export.models.ctranslate2 import read_ctranslate2
from edgemm.export.models.whisper_decoder import (END_OF_TEXT, NO_TIMESTAMPS, PROMPT_IDS, START_OF_TRANSCRIPT,
                                                  whisper_files)
from edgemm.runtime.errors import ExportError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ct2():
    return read_ctranslate2(whisper_files().model_bin)


def test_reader_reads_the_packaged_whisper(ct2):
    spec, arrays = ct2
    assert spec == "WhisperSpec"
    assert len(arrays) == 149  # 148 variables + the projection alias
    emb = arrays["decoder/embeddings/weight"]
    assert emb.shape == (51864, 384) and emb.dtype == np.float16
    assert arrays["decoder/projection/weight"] is emb  # the alias resolves to the same array
    assert arrays["decoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)  # fused q, k, v
    assert arrays["decoder/layer_0/attention/linear_1/weight"].shape == (768, 384)  # fused cross k, v
    assert int(arrays["decoder/num_heads"]) == 6 and arrays["decoder/num_heads"].dtype == np.int16
    # Whisper's k projections have no bias: the converter stores zeros for those rows.
    assert not arrays["decoder/layer_0/self_attention/linear_0/bias"][384:768].any()
    assert arrays["decoder/layer_0/self_attention/linear_0/bias"][:384].any()


def test_special_tokens_match_the_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(whisper_files().tokenizer))
    assert tok.token_to_id("<|startoftranscript|>") == START_OF_TRANSCRIPT
    assert tok.token_to_id("<|notimestamps|>") == NO_TIMESTAMPS
    assert tok.token_to_id("<|endoftext|>") == END_OF_TEXT
    ids = tok.encode(" A tabby cat.").ids
    assert tuple(ids[:2]) == PROMPT_IDS and ids[-1] == END_OF_TEXT


def _copy(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "model.bin"
    p.write_bytes(data)
    return p


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    raw = whisper_files().model_bin.read_bytes()
    for bad, what in ((raw[: len(raw) // 2], "file ends inside"),  # truncated mid-tensor
                      (raw[:-3], "file ends inside"),  # truncated inside the aliases
                      (b"\x07\x00\x00\x00" + raw[4:], "binary version 7"),
                      (raw + b"\x00", "unexpected bytes"),
                      (b"", "file ends inside")):
        with pytest.raises(ExportError, match=what):
            read_ctranslate2(_copy(tmp_path, bad))
    # A byte size that disagrees with its shape: the first variable's u32 nbytes (rank 0, int8 → 1 byte).
    name_len = int.from_bytes(raw[4:6], "little")
    first = 4 + 2 + name_len + 4 + 4  # version, spec name, revision, count
    first_name = int.from_bytes(raw[first : first + 2], "little")
    nbytes_at = first + 2 + first_name + 1 + 1  # name, rank 0 (no dims), dtype
    corrupt = bytearray(raw)
    corrupt[nbytes_at : nbytes_at + 4] = (10**9).to_bytes(4, "little")
    with pytest.raises(ExportError, match="declares 1000000000 bytes"):
        read_ctranslate2(_copy(tmp_path, bytes(corrupt)))
    corrupt = bytearray(raw)
    corrupt[nbytes_at - 1] = 9  # an unknown dtype code
    with pytest.raises(ExportError, match="unknown dtype code 9"):
        read_ctranslate2(_copy(tmp_path, bytes(corrupt)))
    with pytest.raises(ExportError, match="does not exist"):
        read_ctranslate2(tmp_path / "absent.bin")


def test_causal_decoder_shares_the_token_embedding():
    import torch

    from edgemm.export.models.whisper_decoder import whisper_text_decoder

    torch.set_num_threads(1)
    d = whisper_text_decoder()
    assert type(d).__name__ == "WhisperForCausalLM"
    assert d.proj_out.weight.data_ptr() == d.model.decoder.embed_tokens.weight.data_ptr()
    memory = torch.zeros(2, 5, 384)
    logits = d(input_ids=torch.tensor([list(PROMPT_IDS)] * 2), encoder_outputs=(memory,)).logits
    assert logits.shape == (2, 2, 51864)


def _speech(text: str, path: Path) -> np.ndarray:
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True,
                   capture_output=True)
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="needs espeak-ng and sox: apt-get install -y espeak-ng sox")
def test_mapped_whisper_transcribes_synthesised_speech(tmp_path):
    """The whole mapping is right only if the model transcribes real speech: one wrong tensor breaks it."""
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    from edgemm.export.models.whisper_decoder import whisper_text_decoder, whisper_tiny_en

    torch.set_num_threads(1)
    audio = _speech("A brown dog is running on the beach next to the water.", tmp_path / "speech.wav")
    features = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt").input_features
    model = whisper_tiny_en()
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=30, decoder_input_ids=torch.tensor([list(PROMPT_IDS)]))
    tok = Tokenizer.from_file(str(whisper_files().tokenizer))
    text = tok.decode(ids[0].tolist(), skip_special_tokens=True).strip().lower()
    for word in ("dog", "running", "beach", "water"):
        assert word in text, text
    # The causal decoder on the same encoder states writes the same tokens.
    with torch.no_grad():
        memory = model.model.encoder(features).last_hidden_state
        causal = whisper_text_decoder().generate(input_ids=torch.tensor([list(PROMPT_IDS)]), encoder_outputs=memory,
                                                 max_new_tokens=30, do_sample=False)
    words = tok.decode(causal[0].tolist(), skip_special_tokens=True).strip().lower()
    assert words == text
