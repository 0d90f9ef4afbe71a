"""The decoding state of the Bicameral byte LM (seed 000): per layer a ring buffer of the last block inputs and the
running sums behind the causal context mean, on transformers' cache layers (not a key/value cache)."""

from __future__ import annotations

import torch

from ..modeling_zoo_common import ZooStateCache
from .configuration_bicameral import BicameralConfig


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs and running sums run in at least float32 (half precision FFTs lose too much)."""
    return torch.promote_types(dtype, torch.float32)



class BicameralCache(ZooStateCache):
    """State of the Bicameral LM during decoding (not a key/value cache).

    Per layer: `inputs` `(batch, ring, hidden)`, a ring buffer of the last `ring = max(kernel_len, time_kernel_size)`
    normalised, masked block inputs, the current one included (position `p` in slot `p % ring`); `context_sum`
    `(batch, hidden)` and `context_count` `(batch, 1)`, the running sum and number of real bytes behind the causal
    context mean, updated in place. The size does not grow with the sequence. Every layer is a transformers
    linear-attention cache layer ([`ZooStateLayer`], `config.layer_types` is `"linear_attention"`): `inputs` is its
    convolution state, the two sums its recurrent states. Everything a decode step derives from the weights (the
    effective kernel, which also depends on the cutoff, as a table of its rotations; the fused gate and fusion
    weights) is computed once per generation and kept in `kernels`, with the cutoff it was built for. A decode step
    indexes the ring with the tensor `cache_position` and writes in place, so it compiles to one graph.

    Args:
        config: the model's configuration.
        batch_size: rows being decoded.
        device / dtype: where and in which precision the state lives.
        compileable: report `is_compileable` (then `generate` compiles the decode steps on CUDA by itself, or on any
            device with a `compile_config` that asks for it).
    """

    def __init__(self, config: BicameralConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 compileable: bool = False) -> None:
        super().__init__(config.num_hidden_layers, device=device)
        self.compileable = compileable
        self.ring = max(config.kernel_len, config.time_kernel_size)
        # layer -> (the cutoff it was built for, the decode tables, see `BicameralBlock.decode_tables`)
        self.kernels: dict[int, tuple[int | None, dict[str, torch.Tensor]]] = {}
        for layer_idx in range(config.num_hidden_layers):
            self.set_state(layer_idx, "inputs",
                           torch.zeros(batch_size, self.ring, config.hidden_size, device=device, dtype=dtype),
                           kind="conv")
            self.set_state(layer_idx, "context_sum", torch.zeros(batch_size, config.hidden_size, device=device,
                                                                 dtype=work_dtype(dtype)), kind="recurrent")
            self.set_state(layer_idx, "context_count", torch.zeros(batch_size, 1, device=device,
                                                                   dtype=work_dtype(dtype)), kind="recurrent")
        self.fix_addresses()

    def reset(self) -> None:
        super().reset()
        self.kernels.clear()

    @property
    def is_compileable(self) -> bool:
        return self.compileable

    def check_cutoff(self, cutoff: int | None) -> None:
        """Refuse to go on when the cutoff changed (`set_cutoff`) since the state was filled and the model has 2+
        layers: the cached inputs of layers >= 1 were computed under the old cutoff, so the continuation would
        silently differ from a fresh forward. One layer is fine (its inputs are the embeddings; its kernel is
        rebuilt)."""
        if self.seen_tokens and len(self.layers) > 1 and any(old != cutoff for old, _ in self.kernels.values()):
            raise ValueError(
                f"The cutoff changed (to {cutoff}) while a filled BicameralCache is in use: the cached inputs of "
                "layers >= 1 were computed under the old cutoff. Re-prefill (a new cache, or `cache.reset()` and "
                "the whole sequence) after `set_cutoff`.")

    def past_inputs(self, layer_idx: int, count: int) -> torch.Tensor:
        """The last `count` (`< ring`) inputs of layer `layer_idx` before the new ones, in time order, `(batch,
        count, hidden)`; positions before the start read as zeros."""
        slots = torch.arange(self.seen_tokens - count, self.seen_tokens, device=self.cache_position.device)
        return self.get_state(layer_idx, "inputs")[:, slots % self.ring]

    def store_inputs(self, layer_idx: int, x: torch.Tensor) -> None:
        """Write the new inputs `x` `(batch, new, hidden)` (positions `seen_tokens ...`) into the ring buffer."""
        keep = min(x.shape[1], self.ring)
        positions = torch.arange(self.seen_tokens + x.shape[1] - keep, self.seen_tokens + x.shape[1], device=x.device)
        self.get_state(layer_idx, "inputs").index_copy_(1, positions % self.ring, x[:, -keep:])

    def update_context(self, layer_idx: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Running context mean at each new position, `(batch, new, hidden)`, and advance the sums in place."""
        total, count = self.get_state(layer_idx, "context_sum"), self.get_state(layer_idx, "context_count")
        sums = total[:, None] + torch.cumsum(x.to(total.dtype), dim=1)
        counts = count[:, None] + torch.cumsum(mask.to(total.dtype), dim=1)[..., None]
        total.copy_(sums[:, -1])
        count.copy_(counts[:, -1])
        return (sums / counts.clamp(min=1.0)).to(x.dtype)


__all__ = ["BicameralCache", "work_dtype"]
