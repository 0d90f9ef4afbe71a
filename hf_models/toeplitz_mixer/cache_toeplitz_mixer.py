"""The exact decoding cache of the Toeplitz mixer (seed 001): each layer's mixer inputs in a preallocated buffer,
on transformers' cache layers for convolution and recurrent state."""

from __future__ import annotations

import torch

from ..modeling_zoo_common import ZooStateCache
from .configuration_toeplitz_mixer import ToeplitzMixerConfig


class ToeplitzMixerCache(ZooStateCache):
    """Exact decoding state of a [`ToeplitzMixerModel`]: each layer's mixer inputs, in a preallocated buffer.

    Every layer is a transformers linear-attention cache layer ([`ZooStateLayer`], `config.layer_types` is
    `"conv"`): `history` and `token_ids` are its convolution states (input histories, sequence on dimension 2 and 1),
    `row_positions` a recurrent state (a running count).

    Layer `l` holds `history` of shape `(batch, num_heads, max_position_embeddings, head_dim)`, whose slot `t` is the
    mixer input p of position t (zero at padded positions); layer 0 also holds `token_ids` `(batch,
    max_position_embeddings)`, which the `"sliding_recompute"` overflow policy re-reads, and `row_positions` `(batch,)`,
    the number of real (unpadded) tokens of each row so far, i.e. the position of the row's next token. Besides the
    Python count `seen_tokens`, `cache_position` `(1,)` holds the next slot as a tensor, advanced in place, which the
    shape-static decode step (`config.decode_step`) indexes with, so a compiled step never depends on a Python int.
    Writing a token is an indexed copy into the buffers, never a concatenation.

    Args:
        config: the model's config.
        batch_size: rows of the batch.
        device / dtype: where and in which dtype the history is kept.
    """

    def __init__(
        self,
        config: ToeplitzMixerConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(config.num_hidden_layers, max_length=config.max_position_embeddings, device=device)
        for layer_idx in range(config.num_hidden_layers):
            self._allocate_layer(layer_idx, config, batch_size, device, dtype)
        self.set_state(0, "token_ids", torch.zeros(batch_size, config.max_position_embeddings, dtype=torch.long,
                                                   device=device), kind="conv")
        self.set_state(0, "row_positions", torch.zeros(batch_size, dtype=torch.long, device=device),
                       kind="recurrent")
        self.layer_tables: dict[int, dict[str, torch.Tensor]] = {}  # kernel-derived tensors, see ToeplitzMixer._tables
        self.slots = torch.arange(config.max_position_embeddings, device=device)
        self.fix_addresses()
        self.knows_token_ids = True

    def _allocate_layer(self, layer_idx: int, config: ToeplitzMixerConfig, batch_size: int,
                        device: torch.device | str | None, dtype: torch.dtype) -> None:
        """The per-layer state: the whole input history `(batch, num_heads, max_position_embeddings, head_dim)`."""
        shape = (batch_size, config.num_heads, config.max_position_embeddings, config.head_dim)
        self.set_state(layer_idx, "history", torch.zeros(shape, device=device, dtype=dtype), kind="conv")

    def write_history(self, layer_idx: int, p: torch.Tensor) -> torch.Tensor:
        """Store the mixer inputs `p` `(B, T, H, D)` of the tokens after the `seen_tokens` cached ones.

        Returns:
            The filled part of the history, `(B, H, seen_tokens + T, D)` (a view).
        """
        history = self.get_state(layer_idx, "history")
        start, end = self.seen_tokens, self.seen_tokens + p.shape[1]
        history[:, :, start:end] = p.transpose(1, 2)
        return history[:, :, :end]

    def write_history_static(self, layer_idx: int, p: torch.Tensor) -> torch.Tensor:
        """Store the mixer input `p` `(B, 1, H, D)` of one new token in slot `cache_position` (a tensor index).

        Returns:
            The whole history buffer `(B, H, max_position_embeddings, D)`; slots after the new one are zero.
        """
        history = self.get_state(layer_idx, "history")
        history.index_copy_(2, self.cache_position, p.transpose(1, 2))
        return history

    def next_positions(self, token_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        """Positions `(B, num_tokens)` of the next tokens of each row, counted over real tokens only (a padded token
        gets its row's previous position, clamped at 0; it is excluded from the mixing anyway)."""
        start = self.get_state(0, "row_positions")[:, None]
        if token_mask is None:
            return start + torch.arange(num_tokens, device=start.device)
        return (start + token_mask.long().cumsum(-1) - 1).clamp(min=0)

    def advance(
        self,
        input_ids: torch.Tensor | None,
        num_tokens: int,
        token_mask: torch.Tensor | None = None,
        static: bool = False,
        count_in_python: bool = True,
    ) -> None:
        """Record `num_tokens` new tokens (after every layer has written its history).

        Args:
            input_ids: their ids `(B, num_tokens)` (`None` for `inputs_embeds`).
            token_mask: `(B, num_tokens)`, 0 at padded tokens (`None`: all real).
            static: write the ids at the tensor position `cache_position` (one token, no Python-int slicing).
            count_in_python: also advance the Python count now; `False` (a compiled static step) only marks it
                stale, so the compiled graph neither reads nor depends on it.
        """
        if input_ids is None:
            self.knows_token_ids = False
        elif static:
            self.get_state(0, "token_ids").index_copy_(1, self.cache_position, input_ids)
        else:
            self.get_state(0, "token_ids")[:, self.seen_tokens:self.seen_tokens + num_tokens] = input_ids
        real = num_tokens if token_mask is None else token_mask.sum(-1)
        self.get_state(0, "row_positions").add_(real)
        self.advance_count(num_tokens, in_python=count_in_python)

    def cached_token_ids(self) -> torch.Tensor:
        """The token ids of the cached positions, `(B, seen_tokens)`.

        Raises:
            ValueError: a forward pass was fed `inputs_embeds`, so the ids are unknown.
        """
        if not self.knows_token_ids:
            raise ValueError("the cache was filled from `inputs_embeds`; context_overflow='sliding_recompute' "
                             "needs `input_ids` to re-read the window")
        return self.get_state(0, "token_ids")[:, :self.seen_tokens]

    def reset(self) -> None:
        super().reset()
        self.layer_tables.clear()
        self.knows_token_ids = True


__all__ = ["ToeplitzMixerCache"]
