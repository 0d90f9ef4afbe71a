"""The data pipeline: document splitting, EOS handling, packing, the validation split and its error messages."""

from __future__ import annotations

import json
import random
import re

import pytest
from datasets import Dataset

from training.common import UsageError
from training.data import DataArguments, load_documents, split_documents, tokenize_and_pack
from training.tokenization import train_bpe_tokenizer

import hf_models


@pytest.mark.parametrize(
    "separator,text,expected",
    [
        ("eot", "one\ntwo\n<|endoftext|>\nthree\n<|endoftext|>\n", ["one\ntwo", "three"]),
        ("blank_line", "one\ntwo\n\nthree\n \n\nfour", ["one\ntwo", "three", "four"]),
        ("line", "a\nb\n\nc", ["a", "b", "c"]),
        ("none", "a\n\nb", ["a\n\nb"]),
        ("auto", "a\n\nb\n<|endoftext|>\nc", ["a\n\nb", "c"]),
        ("auto", "a\n\nb", ["a", "b"]),
    ],
)
def test_split_documents(separator, text, expected):
    assert split_documents(text, separator) == expected


def test_every_document_ends_with_eos_and_eos_targets_are_kept():
    tokenizer = hf_models.ByteTokenizer()
    documents = Dataset.from_dict({"text": ["ab", "cde", "f"]})
    packed = tokenize_and_pack(documents, tokenizer, block_size=3)
    eos = tokenizer.eos_token_id
    stream = [97, 98, eos, 99, 100, 101, eos, 102, eos]
    assert packed.blocks["input_ids"] == [stream[0:3], stream[3:6], stream[6:9]]
    assert packed.blocks["labels"] == packed.blocks["input_ids"]  # nothing masked: EOS is a target like any token
    assert (packed.num_documents, packed.num_tokens, packed.num_bytes) == (3, 9, 9)
    assert packed.tokens_per_byte == 1.0


def test_packing_drops_only_the_tail_shorter_than_a_block():
    tokenizer = hf_models.ByteTokenizer()
    packed = tokenize_and_pack(Dataset.from_dict({"text": ["abcdefg"]}), tokenizer, block_size=3)
    assert packed.blocks["input_ids"] == [[97, 98, 99], [100, 101, 102]]


def test_validation_split_is_by_document_and_seeded(tmp_path, stories_file):
    corpus_file = tmp_path / "docs.txt"
    corpus_file.write_text("\n\n".join(f"document {i} line one\ndocument {i} line two" for i in range(200)))
    args = DataArguments(train_file=str(corpus_file), validation_split_percentage=10)
    corpus = load_documents(args, seed=3)
    train, validation = set(corpus["train"]["text"]), set(corpus["validation"]["text"])
    assert len(validation) == 20 and len(train) == 180 and not train & validation
    assert all(text.count("\n") == 1 for text in validation)  # whole documents, never a cut one
    assert load_documents(args, seed=3)["validation"]["text"] == corpus["validation"]["text"]
    assert load_documents(args, seed=4)["validation"]["text"] != corpus["validation"]["text"]
    stories = load_documents(DataArguments(train_file=str(stories_file)))  # paragraphs: stories are not marked
    assert len(stories["validation"]) == round((len(stories["train"]) + len(stories["validation"])) * 0.05)


def test_real_corpus_packs_with_a_bpe_tokenizer(shakespeare_file):
    corpus = load_documents(DataArguments(train_file=str(shakespeare_file), max_train_documents=300))
    assert len(corpus["train"]) == 300
    tokenizer = train_bpe_tokenizer(corpus["train"]["text"], vocab_size=400)
    packed = tokenize_and_pack(corpus["train"], tokenizer, block_size=32)
    assert all(len(row) == 32 for row in packed.blocks["input_ids"])
    assert 0.2 < packed.tokens_per_byte < 1.0
    assert sum(row.count(tokenizer.eos_token_id) for row in packed.blocks["input_ids"]) >= 250


def test_jsonl_and_validation_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"story": f"story number {i}"}) for i in range(5)) + "\n")
    validation = tmp_path / "valid.txt"
    validation.write_text("held out one\n\nheld out two\n")
    corpus = load_documents(DataArguments(train_file=str(train), validation_file=str(validation)))
    assert corpus["train"]["text"] == [f"story number {i}" for i in range(5)]
    assert corpus["validation"]["text"] == ["held out one", "held out two"]


def _error(callable_, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as error:
        callable_(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_clear_errors(tmp_path):
    assert "data file not found" in _error(load_documents, DataArguments(train_file=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert "holds no text" in _error(load_documents, DataArguments(train_file=str(empty)))
    single = tmp_path / "single.txt"
    single.write_text("only one document")
    assert "single document" in _error(load_documents, DataArguments(train_file=str(single)))
    record = tmp_path / "bad.jsonl"
    record.write_text(json.dumps({"body": "x"}) + "\n")
    assert "--text_column" in _error(load_documents, DataArguments(train_file=str(record)))
    short = Dataset.from_dict({"text": ["tiny"]})
    assert "--block_size" in _error(tokenize_and_pack, short, hf_models.ByteTokenizer(), 64)
    assert "--block_size" in _error(DataArguments, train_file="x", block_size=1)
    assert "--doc_separator" in _error(DataArguments, train_file="x", doc_separator="pages")


def test_unreachable_hub_dataset_names_train_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = _error(load_documents, DataArguments(dataset_name="SimpleStories/SimpleStories"))
    assert "SimpleStories/SimpleStories" in message and "--train_file" in message


def test_hub_dataset_path_with_a_mocked_hub(monkeypatch):
    from datasets import DatasetDict

    import training.data as data

    calls = []

    def fake_load_dataset(name, config_name):
        calls.append((name, config_name))
        return DatasetDict(train=Dataset.from_dict({"story": [f"story {i}" for i in range(40)], "id": list(range(40))}))

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    corpus = load_documents(DataArguments(), seed=0)
    assert calls == [("SimpleStories/SimpleStories", None)]
    assert corpus["train"].column_names == ["text"] and len(corpus["train"]) == 38 and len(corpus["validation"]) == 2


def test_a_file_that_is_not_utf8_text_is_refused_with_the_share_of_invalid_bytes(tmp_path, caplog):
    binary = tmp_path / "weights.bin.txt"
    binary.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4000)))  # no NUL, mostly invalid
    message = _error(load_documents, DataArguments(train_file=str(binary)))
    assert str(binary) in message and "invalid UTF-8 bytes" in message
    share = float(re.search(r"has ([\d.]+)% invalid", message).group(1))
    assert 30 < share <= 100
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a story\n\n\x00\x00 another story\n")
    assert "NUL bytes" in _error(load_documents, DataArguments(train_file=str(nul)))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"text": "café crème brûlée " * 20}, ensure_ascii=False).encode("latin-1"))
    assert "invalid UTF-8 bytes" in _error(load_documents, DataArguments(train_file=str(latin1)))


def test_a_stray_invalid_byte_is_replaced_with_a_warning(tmp_path, caplog):
    text = tmp_path / "mostly.txt"
    text.write_bytes(("Once upon a time. " * 300 + "\n\n").encode() + b"\xff" + ("The end. " * 300).encode())
    with caplog.at_level("WARNING"):
        documents = load_documents(DataArguments(train_file=str(text), validation_split_percentage=50.0), seed=0)
    assert any("\ufffd" in row for split in documents.values() for row in split["text"])
    assert "1 invalid UTF-8 sequences" in caplog.text
