"""Held-out metrics shared by the training CLI and the experiments: the exact bits per byte of a causal LM."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def exact_bits_per_byte(model: torch.nn.Module, blocks: Sequence[dict[str, list[int]]], *, token_bytes: torch.Tensor,
                        batch_size: int, shift: int = 1) -> float:
    """Bits per byte as nanochat reports it: the summed next-token losses (nats) of the predicted tokens over ln 2 ×
    the UTF-8 bytes those tokens stand for. Tokenizer-independent.

    Args:
        model: a causal LM whose output has `logits` `(batch, seq, vocab)`.
        blocks: rows of `input_ids` and `labels` (`-100`: not scored), e.g. a packed validation split.
        token_bytes: `(vocab,)` bytes each token id stands for (`training.tokenization.token_byte_lengths`); special
            tokens (the EOS) count no bytes and their losses are left out.
        batch_size: rows per forward pass.
        shift: position `t` predicts label `t + shift` (1 for next-token models; a Bicameral `chunk_size`).
    """
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    token_bytes = token_bytes.to(device)
    nats, num_bytes = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        input_ids = torch.tensor([row["input_ids"] for row in batch], device=device)
        targets = torch.tensor([row["labels"] for row in batch], device=device)[:, shift:]
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-shift].float()
        losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        weights = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        nats += float((losses * (weights > 0)).sum())
        num_bytes += int(weights.sum())
    model.train(was_training)
    if num_bytes == 0:
        raise ValueError("the blocks hold no scored token that stands for any byte")
    return nats / (math.log(2) * num_bytes)


__all__ = ["exact_bits_per_byte"]
