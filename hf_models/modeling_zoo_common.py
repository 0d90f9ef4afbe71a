"""Shared modeling machinery of the zoo: the pre-trained-model base and the base of non-key/value caches.

Like `configuration_zoo_common.py`, this file is copied next to saved weights for remote code, so it depends
only on `torch`, `transformers` and sibling modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .configuration_zoo_common import bundle_remote_code


class ZooPreTrainedModel(PreTrainedModel):
    """`PreTrainedModel` whose saved folders load with `trust_remote_code=True` where `hf_models` is absent."""

    def save_pretrained(self, save_directory: str | Path, *args: Any, push_to_hub: bool = False, **kwargs: Any):
        repo_id = kwargs.pop("repo_id", None)
        hub_kwargs = {key: kwargs.pop(key) for key in ("commit_message", "private", "create_pr") if key in kwargs}
        super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        bundle_remote_code(save_directory)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(save_directory).name, token=kwargs.get("token"), **hub_kwargs)


class ZooStateLayer:
    """One layer's slice of a `ZooStateCache`: named, batch-first state tensors.

    Unlike a key/value layer, what a state layer holds is architecture-specific (an input history, a ring
    buffer, running sums); every tensor has the batch on dimension 0, which is all that beam search and batch
    selection need to know.
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        shapes = {name: tuple(tensor.shape) for name, tensor in self.states.items()}
        return f"{self.__class__.__name__}({shapes})"

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).shape[0] if self.states else -1

    def reset(self) -> None:
        for tensor in self.states.values():
            tensor.zero_()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name, tensor in self.states.items():
            self.states[name] = tensor[indices.to(tensor.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name, tensor in self.states.items():
            self.states[name] = tensor.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "This cache summarises the past in a state that cannot be rolled back, so it cannot be cropped "
            "(assisted or speculative decoding is not supported)."
        )

    def offload(self) -> None:
        """State caches are small and stay on their device."""

    def prefetch(self) -> None:
        """State caches are small and stay on their device."""


class ZooStateCache(Cache):
    """Base of the zoo's non-key/value caches (input histories, convolution states).

    It keeps one `ZooStateLayer` per model layer and the number of tokens seen so far. Subclasses allocate their
    tensors (preallocated, so a decode step never concatenates) and define the update rule the model calls.
    Models that use such a cache set `_supports_default_dynamic_cache()` to `False` so that `generate` lets the
    model create it on the first forward pass.

    Args:
        num_layers (`int`): number of layers holding state.
        max_length (`int`, *optional*): the most tokens the cache can hold (`None`: unbounded).
    """

    def __init__(self, num_layers: int, max_length: int | None = None) -> None:
        super().__init__(layers=[ZooStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0
        self.max_length = max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def get_state(self, layer_idx: int, name: str) -> torch.Tensor | None:
        """The state tensor `name` of layer `layer_idx`, or `None` before it is first written."""
        return self.layers[layer_idx].states.get(name)

    def set_state(self, layer_idx: int, name: str, tensor: torch.Tensor) -> None:
        """Store (or replace) the state tensor `name` of layer `layer_idx` (batch first)."""
        self.layers[layer_idx].states[name] = tensor
