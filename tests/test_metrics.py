"""The exact bits per byte (training.metrics) on hand-made examples."""

from __future__ import annotations

import pytest
import torch

from training.metrics import exact_bits_per_byte


class Uniform(torch.nn.Module):
    """Uniform logits over 8 tokens: ln 8 nats = 3 bits per scored token."""

    def forward(self, input_ids, **kwargs):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, 8)})()


TOKEN_BYTES = torch.tensor([1, 1, 1, 2, 0, 3, 1, 1])


def test_bits_per_byte_on_a_hand_made_example():
    """Targets 2, 3, 4, 5 of a block stand for 1, 2, 0 (a special token: its loss is left out) and 3 bytes: 3
    scored tokens x 3 bits / 6 bytes = 1.5."""
    blocks = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}] * 3
    assert exact_bits_per_byte(Uniform(), blocks, token_bytes=TOKEN_BYTES, batch_size=2) == pytest.approx(3 * 3 / 6)
    padded = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, -100, -100]}]  # ignored targets count nothing
    assert exact_bits_per_byte(Uniform(), padded, token_bytes=TOKEN_BYTES, batch_size=1) == pytest.approx(2 * 3 / 3)


def test_a_longer_shift_scores_the_later_targets():
    """With shift 2 (a Bicameral chunk of 2) the scored targets are 3, 4, 5: 2 scored tokens x 3 bits / 5 bytes."""
    blocks = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}]
    assert exact_bits_per_byte(Uniform(), blocks, token_bytes=TOKEN_BYTES, batch_size=1, shift=2) == \
        pytest.approx(2 * 3 / 5)


def test_blocks_without_bytes_are_refused():
    with pytest.raises(ValueError, match="no scored token"):
        exact_bits_per_byte(Uniform(), [{"input_ids": [4, 4], "labels": [4, 4]}], token_bytes=TOKEN_BYTES,
                            batch_size=1)
