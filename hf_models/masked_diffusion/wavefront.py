"""The wavefront sampler of the masked diffusion LM (`diffusion_generate(sampler="wavefront")`): within one step,
masked positions are filled in waves by the sampler head, each wave taking the positions next to a filled token,
with a naive bootstrap when no masked position has a filled neighbour (see the module docstring of
`modeling_masked_diffusion.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sampling import TokenSampler, top_k_per_row

if TYPE_CHECKING:
    from .modeling_masked_diffusion import MaskedDiffusionForMaskedLM, MaskedDiffusionLMOutput


def filled_neighbour(is_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Boolean `(batch, seq)`: the position has a left or right neighbour that is a real (not padding), unmasked
    token."""
    filled = valid & ~is_mask
    edge = filled.new_zeros(filled.shape[0], 1)
    return torch.cat((edge, filled[:, :-1]), dim=1) | torch.cat((filled[:, 1:], edge), dim=1)


def wavefront_fill(
    model: MaskedDiffusionForMaskedLM,
    x: torch.LongTensor,
    outputs: MaskedDiffusionLMOutput,
    *,
    fillable: torch.Tensor,
    budget: torch.Tensor,
    valid: torch.Tensor,
    sample: TokenSampler,
    bootstrap_ratio: float,
) -> tuple[torch.LongTensor, tuple[tuple[str, torch.Tensor], ...]]:
    """Fill up to `budget[row]` of the `fillable` masked positions of `x` in waves with the sampler head.

    Each wave takes, per row, the fillable masked positions with at least one filled neighbour, samples them from
    the sampler head given `[E(left) ; h ; E(right)]` with the neighbours as they are now, and commits the most
    confident ones the row's remaining budget allows. A row with budget left but no such position is bootstrapped
    first: the `bootstrap_ratio` share of its masked positions (at least one, at most its budget) with the most
    confident naive samples from the main logits are committed.

    Args:
        model: the model (its sampler head and embedding are used).
        x: the sequences `(batch, seq)` with [MASK]s.
        outputs: the trunk's outputs on `x` at the start of the step (`logits`, `last_hidden_state`).
        fillable: `(batch, seq)` positions that may be filled in this step.
        budget: `(batch,)` how many positions to fill per row.
        valid: `(batch, seq)` real positions (not padding).
        sample: the token sampler (temperature, top-p, generator).
        bootstrap_ratio: the bootstrap share (`sampler_min_neighbors_ratio`).

    Returns:
        The updated sequences and the fills in order: `("bootstrap" | "wave", positions filled (batch, seq))`.
    """
    mask_id = model.config.mask_token_id
    remaining = budget.clone()
    fills = []
    while True:
        open_positions = fillable & (x == mask_id)
        active = (remaining > 0) & open_positions.any(dim=1)
        if not bool(active.any()):
            break
        eligible = open_positions & filled_neighbour(x == mask_id, valid) & active[:, None]
        stuck = active & ~eligible.any(dim=1)
        if bool(stuck.any()):
            candidates = open_positions & stuck[:, None]
            tokens, confidence = sample.at(outputs.logits[candidates], candidates, fill_value=mask_id)
            count = torch.ceil(candidates.sum(dim=1).float() * bootstrap_ratio).long().clamp(min=1)
            count = torch.minimum(count, remaining) * stuck
            chosen = top_k_per_row(confidence, candidates, count)
            x = torch.where(chosen, tokens, x)
            remaining = remaining - chosen.sum(dim=1)
            fills.append(("bootstrap", chosen))
            continue
        inputs = model.sampler_inputs(x, outputs.last_hidden_state, valid)[eligible]
        tokens, confidence = sample.at(model.sampler_logits(inputs), eligible, fill_value=mask_id)
        chosen = top_k_per_row(confidence, eligible, remaining)
        x = torch.where(chosen, tokens, x)
        remaining = remaining - chosen.sum(dim=1)
        fills.append(("wave", chosen))
    return x, tuple(fills)


__all__ = ["filled_neighbour", "wavefront_fill"]
