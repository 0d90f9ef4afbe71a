"""Tokenizers for the zoo: a byte-level BPE trained offline on the training corpus, the byte tokenizer, or any
tokenizer by name."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hf_models.registry import ArchitectureSpec

from .common import UsageError

SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "mask_token": "<mask>"}
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization) on `texts`, offline.

    The special tokens take ids 0, 1, 2: end-of-text (the EOS appended after every document), padding and mask.
    Training is deterministic for the same texts and settings.

    Args:
        texts: the documents to learn merges from.
        vocab_size: size of the vocabulary, special tokens included (at least 259: the 256 bytes and 3 specials).
        min_frequency: the fewest occurrences a pair needs to be merged.

    Raises:
        UsageError: `vocab_size` is too small.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise UsageError(f"--vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer by Hub id or folder, with a one-line error when it cannot be found."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if Path(name_or_path).exists():
            reason = f"the folder holds no loadable tokenizer ({str(error).splitlines()[0]})"
        else:
            reason = "no such folder, and the Hub id could not be reached; pass a local folder as --tokenizer_name"
        raise UsageError(f"could not load a tokenizer from '{name_or_path}': {reason}") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer '{name_or_path}' has no EOS token; the data pipeline appends one after each document")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def record_model_max_length(tokenizer: PreTrainedTokenizerBase, spec: ArchitectureSpec,
                            config: PreTrainedConfig) -> None:
    """Write the model's hard context into `tokenizer.model_max_length` (saved with the tokenizer), so pipelines
    and lm-eval warn or truncate before the model refuses a longer input.

    Only for an architecture whose spec declares `hard_context` (its context is `config.max_position_embeddings`);
    a tokenizer that already says less keeps its value.
    """
    if spec.hard_context:
        tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The number of UTF-8 bytes each token id stands for, `(len(tokenizer),)` int64: 0 for special tokens; for a
    byte-level tokenizer (a `ByteLevel` decoder, or the zoo's byte tokenizer) one byte per symbol of the token, so a
    token holding part of a multi-byte character counts the bytes it holds; otherwise the bytes of its decoded text.
    The denominator of an exact bits-per-byte."""
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel) or \
        type(tokenizer).__name__ == "ByteTokenizer"
    ids = list(range(len(tokenizer)))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    lengths = [0 if i in special or token is None else
               len(token) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
               for i, token in zip(ids, tokens)]
    return torch.tensor(lengths, dtype=torch.long)
