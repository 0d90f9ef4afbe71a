"""Teacher capture: the base model's per-layer activations under `model.npt_disabled()`, from hooks on the real
forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_models.npt import NPTForCausalLM


@dataclass
class TeacherLayer:
    """The base layer's tensors, `(batch, seq, ·)`: input, attention output `a`, MLP input `LN2(h + a)`, MLP output,
    layer output."""

    hidden_in: torch.Tensor
    attn_output: torch.Tensor
    mlp_input: torch.Tensor
    mlp_output: torch.Tensor
    hidden_out: torch.Tensor


@dataclass
class TeacherCapture:
    """The teacher's layers (by index) and its logits `(batch, seq, vocab)`."""

    layers: dict[int, TeacherLayer]
    logits: torch.Tensor


@torch.no_grad()
def capture_teacher(model: NPTForCausalLM, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.LongTensor | None = None, layers: Sequence[int] | None = None
                    ) -> TeacherCapture:
    """Run the base model (`npt_disabled()`) once and capture, with hooks on the real forward pass, the tensors of
    `layers` (default: the NPT layers). The hooks exist only during this call."""
    layers = list(model.npt_layers) if layers is None else list(layers)
    store: dict[int, dict[str, torch.Tensor]] = {index: {} for index in layers}
    handles = []

    def keep(index: int, name: str, value: torch.Tensor) -> None:
        store[index][name] = value

    try:
        for index in layers:
            layer = model.model.layers[index]
            handles += [
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, i=index: keep(i, "hidden_in", args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True),
                layer.self_attn.register_forward_hook(lambda m, args, out, i=index: keep(i, "attn_output", out[0])),
                layer.mlp.register_forward_pre_hook(lambda m, args, i=index: keep(i, "mlp_input", args[0])),
                layer.mlp.register_forward_hook(lambda m, args, out, i=index: keep(i, "mlp_output", out)),
                layer.register_forward_hook(lambda m, args, out, i=index: keep(i, "hidden_out", out)),
            ]
        with model.npt_disabled():
            logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return TeacherCapture(layers={index: TeacherLayer(**values) for index, values in store.items()}, logits=logits)
