"""Tokenizers: the byte tokenizer of the byte models and the BPE tokenizer trained offline on a corpus."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from transformers import PreTrainedTokenizerFast

import hf_models
from training.common import UsageError
from training.tokenization import load_tokenizer, train_bpe_tokenizer

TEXT = "Hé said “naïve” — 日本 🙂\n"


def test_byte_tokenizer_maps_utf8_bytes_and_special_ids():
    tokenizer = hf_models.ByteTokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == TEXT
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (256, 257, 258)
    assert len(tokenizer) == 259
    assert tokenizer.decode([72, 256, 105]) == "H<|endoftext|>i"
    assert tokenizer.decode([72, 256, 105], skip_special_tokens=True) == "Hi"


def test_byte_tokenizer_decodes_cut_characters_without_raising():
    tokenizer = hf_models.ByteTokenizer()
    cut = list("日".encode("utf-8"))[:2] + [65]
    assert tokenizer.decode(cut) == "\ufffdA"


def test_byte_tokenizer_pads_and_saves_through_auto_tokenizer(tmp_path):
    tokenizer = hf_models.ByteTokenizer(padding_side="left")
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [257, 257, 97, 98]
    assert batch["attention_mask"][0] == [0, 0, 1, 1]
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenization_byte.py").exists()
    loaded = hf_models.ByteTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_models"] = None
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print(tokenizer({TEXT!r})["input_ids"], len(tokenizer))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"{list(TEXT.encode('utf-8'))} 259"


@pytest.fixture(scope="module")
def shakespeare_texts(shakespeare_file):
    return shakespeare_file.read_text(encoding="utf-8").split("\n\n")[:800]


def test_bpe_is_trained_offline_deterministically_with_fixed_special_ids(shakespeare_texts, tmp_path):
    tokenizer = train_bpe_tokenizer(shakespeare_texts, vocab_size=500)
    again = train_bpe_tokenizer(shakespeare_texts, vocab_size=500)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 500
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert tokenizer.get_vocab() == again.get_vocab()
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT  # byte-level: every string round-trips, nothing is unknown
    assert len(tokenizer("First Citizen: before we proceed")["input_ids"]) < len("First Citizen: before we proceed")
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(TEXT)["input_ids"] == ids and loaded.eos_token_id == 0


def test_tokenizer_errors_are_one_line(shakespeare_texts, tmp_path):
    with pytest.raises(UsageError, match="--vocab_size"):
        train_bpe_tokenizer(shakespeare_texts, vocab_size=100)
    with pytest.raises(UsageError) as error:
        load_tokenizer(str(tmp_path / "nothing"))
    assert "\n" not in str(error.value)
