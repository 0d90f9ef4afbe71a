"""The zoo's data pipeline: a corpus (Hub id or local text / jsonl files) → documents → tokens with an EOS after
every document → packed blocks, with a validation split made by document.

Packed rows carry `labels` equal to `input_ids` (the models shift internally), so EOS targets are kept in the
loss: nothing is masked, unlike the `DataCollatorForLanguageModeling(pad=eos)` recipe that silently drops every
EOS target.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from .common import UsageError

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "SimpleStories/SimpleStories"
DATA_DIR_ENV = "HF_ZOO_DATA"
END_OF_TEXT = "<|endoftext|>"
DOC_SEPARATORS = ("auto", "eot", "blank_line", "line", "none")
_TEXT_COLUMNS = ("text", "story", "content")
# The corpora of `$HF_ZOO_DATA` (see its README): file name -> (the Hub dataset it comes from, its licence), for the
# card's metadata. Other local files get neither.
KNOWN_CORPORA = {
    "tinystories_valid_sample.txt": ("roneneldan/TinyStories", "cdla-sharing-1.0"),
    "tinyshakespeare.txt": ("karpathy/tiny_shakespeare", "public domain"),
}
# Above this share of bytes that are not UTF-8 (or with any NUL byte) a corpus file is refused as binary / not text.
MAX_INVALID_UTF8_SHARE = 0.01


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes training blocks."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training corpus: a .txt file, or .jsonl/.json with a text field. "
                  "Without it, --dataset_name is loaded from the Hub."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation corpus; without it the validation split is cut by document."}
    )
    dataset_name: str = field(
        default=DEFAULT_DATASET, metadata={"help": "Hub dataset used when no --train_file is given."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of the Hub dataset."})
    text_column: str | None = field(
        default=None, metadata={"help": "Column / jsonl field holding the text (default: text, story or content)."}
    )
    doc_separator: str = field(
        default="auto",
        metadata={"help": "How a .txt file splits into documents: 'eot' (lines equal to <|endoftext|>), "
                  "'blank_line' (blank lines), 'line' (each line), 'none' (the whole file), 'auto' "
                  "(eot if the file has such lines, else blank_line)."},
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training row."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Share of documents held out for validation when no validation split exists."}
    )
    max_train_documents: int | None = field(
        default=None, metadata={"help": "Use at most this many training documents (quick runs)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self) -> None:
        if self.doc_separator not in DOC_SEPARATORS:
            raise UsageError(f"--doc_separator must be one of {', '.join(DOC_SEPARATORS)}, got '{self.doc_separator}'")
        if self.block_size < 2:
            raise UsageError(f"--block_size must be at least 2, got {self.block_size}")
        if not 0 < self.validation_split_percentage < 100:
            raise UsageError(
                f"--validation_split_percentage must lie in (0, 100), got {self.validation_split_percentage}"
            )


def default_data_dir() -> Path:
    """The folder of the zoo's local corpora: `$HF_ZOO_DATA`, else `../shared/data` beside the repository."""
    configured = os.environ.get(DATA_DIR_ENV)
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise UsageError(f"corpus folder {path} not found; set {DATA_DIR_ENV} to the folder with the text corpora")
    return path


def split_documents(text: str, separator: str = "auto") -> list[str]:
    """Split a text file's contents into documents (stripped, empty ones dropped).

    Args:
        text: the file's contents.
        separator: `eot`: lines that are exactly `<|endoftext|>`; `blank_line`: one or more blank lines;
            `line`: every line; `none`: the whole text; `auto`: `eot` if such a line exists, else `blank_line`.
    """
    if separator == "auto":
        separator = "eot" if re.search(rf"^\s*{re.escape(END_OF_TEXT)}\s*$", text, flags=re.MULTILINE) else "blank_line"
    if separator == "eot":
        parts = re.split(rf"^\s*{re.escape(END_OF_TEXT)}\s*$", text, flags=re.MULTILINE)
    elif separator == "blank_line":
        parts = re.split(r"\n[ \t]*\n", text)
    elif separator == "line":
        parts = text.split("\n")
    elif separator == "none":
        parts = [text]
    else:
        raise UsageError(f"unknown document separator '{separator}'")
    return [part.strip() for part in parts if part.strip()]


def read_corpus_text(file: Path) -> str:
    """The UTF-8 text of a corpus file; a few invalid bytes become U+FFFD (with a warning).

    Raises:
        UsageError: the file holds a NUL byte or more than `MAX_INVALID_UTF8_SHARE` of invalid UTF-8 bytes (a
            binary file, or text in another encoding), named with the share.
    """
    raw = file.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    # each invalid sequence (a maximal invalid subpart, mostly one byte) becomes one U+FFFD
    invalid = text.count("\ufffd") - raw.count("\ufffd".encode())
    share = invalid / max(len(raw), 1)
    if b"\x00" in raw or share > MAX_INVALID_UTF8_SHARE:
        reason = "holds NUL bytes" if b"\x00" in raw and share <= MAX_INVALID_UTF8_SHARE else \
            f"has {share:.1%} invalid UTF-8 bytes"
        raise UsageError(f"{file} {reason}: it is not UTF-8 text (a binary file, or another encoding; convert it "
                         "with e.g. `iconv -t utf-8`)")
    if invalid:
        logger.warning("%s has %d invalid UTF-8 sequences (%.3f%% of its bytes): each became U+FFFD", file,
                       invalid, 100 * share)
    return text


def _read_file_documents(path: str, data_args: DataArguments) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"data file not found: {path} (check --train_file / --validation_file)")
    if file.suffix in (".jsonl", ".json"):
        documents = [text.strip() for text in _json_texts(file, data_args.text_column) if text and text.strip()]
    else:
        documents = split_documents(read_corpus_text(file), data_args.doc_separator)
    if not documents:
        raise UsageError(f"data file {path} holds no text")
    return documents


def _json_records(file: Path, lines: list[str]) -> list[dict]:
    """The records of a JSON file (an array, one object, or JSON Lines) or a JSON Lines file."""
    if file.suffix == ".json":
        try:
            records = json.loads("\n".join(lines))
            return [records] if isinstance(records, dict) else records
        except json.JSONDecodeError:
            pass  # JSON Lines in a .json file, as the `datasets` json loader accepts
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UsageError(f"{file}: line {number} is not valid JSON ({error.msg})") from None
    return records


def _json_texts(file: Path, text_column: str | None) -> Iterator[str]:
    lines = read_corpus_text(file).splitlines()
    for record in _json_records(file, lines):
        column = text_column or next((name for name in _TEXT_COLUMNS if name in record), None)
        if column is None or column not in record:
            raise UsageError(f"{file}: record without a text field (set --text_column); fields: {sorted(record)}")
        yield record[column]


def _hub_documents(data_args: DataArguments) -> DatasetDict:
    try:
        loaded = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    except Exception as error:  # any failure to reach or read the Hub dataset ends in the same advice
        raise UsageError(
            f"could not load dataset '{data_args.dataset_name}' from the Hugging Face Hub "
            f"({type(error).__name__}); pass --train_file PATH to train on a local text file"
        ) from None
    splits = {}
    for name, split in loaded.items():
        column = data_args.text_column or next((c for c in _TEXT_COLUMNS if c in split.column_names), None)
        if column is None:
            raise UsageError(f"dataset '{data_args.dataset_name}' has no text column (set --text_column); "
                             f"columns: {split.column_names}")
        splits[name] = split.select_columns([column]).rename_column(column, "text") if column != "text" else split.select_columns(["text"])
    return DatasetDict(splits)


def load_documents(data_args: DataArguments, seed: int = 42) -> DatasetDict:
    """The corpus as a `DatasetDict` with `train` and `validation` splits of one `text` column, one row per document.

    Without a validation file or split, `validation_split_percentage` of the documents (at least one) are held
    out, chosen by a seeded shuffle, so no document is split between training and validation.

    Raises:
        UsageError: a missing or empty file, an unreachable Hub dataset, too few documents to split.
    """
    if data_args.train_file:
        splits = {"train": Dataset.from_dict({"text": _read_file_documents(data_args.train_file, data_args)})}
        if data_args.validation_file:
            splits["validation"] = Dataset.from_dict(
                {"text": _read_file_documents(data_args.validation_file, data_args)}
            )
        corpus = DatasetDict(splits)
    else:
        corpus = _hub_documents(data_args)
        if "validation" not in corpus and "test" in corpus:
            corpus["validation"] = corpus.pop("test")
    if "validation" not in corpus:
        documents = corpus["train"]
        if len(documents) < 2:
            raise UsageError("the corpus has a single document: pass --validation_file or use a --doc_separator "
                             "that splits it into several documents")
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        held_out = max(1, round(len(order) * data_args.validation_split_percentage / 100))
        corpus = DatasetDict(
            train=documents.select(sorted(order[held_out:])), validation=documents.select(sorted(order[:held_out]))
        )
    if data_args.max_train_documents is not None:
        corpus["train"] = corpus["train"].select(range(min(data_args.max_train_documents, len(corpus["train"]))))
    return corpus


@dataclass
class PackedSplit:
    """A tokenized, packed split and what it was made of."""

    blocks: Dataset
    num_documents: int
    num_tokens: int
    num_bytes: int

    @property
    def tokens_per_byte(self) -> float:
        """Tokens per UTF-8 byte of the text, each document's EOS counted as one byte (a separator)."""
        return self.num_tokens / self.num_bytes


def tokenize_and_pack(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    split_name: str = "train",
    num_proc: int | None = None,
) -> PackedSplit:
    """Tokenize each document, append EOS, concatenate and cut into rows of `block_size` tokens.

    Returns a `PackedSplit` whose `blocks` has `input_ids` and `labels` (equal) of length `block_size`. Packing
    works on batches of 1,000 documents; the tail of a batch that does not fill a block is dropped.

    Raises:
        UsageError: the split has fewer tokens than one block.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        ids = [doc + [eos] for doc in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]
        return {
            "input_ids": ids,
            "num_tokens": [len(doc) for doc in ids],
            "num_bytes": [len(text.encode("utf-8")) + 1 for text in batch["text"]],
        }

    tokenized = documents.map(
        tokenize, batched=True, remove_columns=documents.column_names, num_proc=num_proc,
        desc=f"Tokenizing {split_name}",
    )
    num_tokens = sum(tokenized["num_tokens"])
    num_bytes = sum(tokenized["num_bytes"])
    if num_tokens < block_size:
        raise UsageError(
            f"the {split_name} split has {num_tokens} tokens, fewer than one block of --block_size {block_size}; "
            f"lower --block_size or use more text"
        )

    def pack(batch: dict) -> dict:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start:start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    # Each map batch (1,000 documents) is packed on its own; its tail shorter than a block is dropped.
    blocks = tokenized.map(
        pack, batched=True, remove_columns=tokenized.column_names, num_proc=num_proc,
        desc=f"Packing {split_name} into blocks of {block_size}",
    )
    if len(blocks) == 0:
        raise UsageError(f"the {split_name} split fills no block of --block_size {block_size}; lower --block_size")
    return PackedSplit(blocks=blocks, num_documents=len(documents), num_tokens=num_tokens, num_bytes=num_bytes)


def read_documents(path: str, doc_separator: str = "auto", text_column: str | None = None) -> list[str]:
    """The documents of one local `.txt` / `.jsonl` / `.json` file, split exactly as the training CLI splits
    `--train_file` (see `split_documents`; `text_column` picks the JSON field, default text, story or content).

    Raises:
        UsageError: a missing or empty file, an unknown separator or a malformed JSON Lines record.
    """
    return _read_file_documents(path, DataArguments(doc_separator=doc_separator, text_column=text_column))
