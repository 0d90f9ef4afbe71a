"""Sampling primitives shared by the masked diffusion LM's decoders (`diffusion_generate` and `decoding.py`): the
token draw with temperature / top-p and its confidence, the per-row top-k selection, and the generation output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """What `diffusion_generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences (`torch.LongTensor` of shape `(batch, prompt + new)`): prompt and generated tokens.
        history (`tuple[torch.LongTensor]`, *optional*): with `output_history`, the sequence after each step
            (masks included), `steps` tensors of shape `(batch, prompt + new)`.
        waves (`tuple[tuple[tuple[str, torch.BoolTensor], ...], ...]`, *optional*): with `output_history` and the
            wavefront sampler, for each step the fills in order: `("bootstrap" | "wave", positions filled (batch,
            prompt + new))`.
        num_remasked (`torch.LongTensor` of shape `(batch,)`): tokens re-masked by the critic over all steps.
        num_model_calls (`torch.LongTensor` of shape `(batch,)`): trunk passes while the row still had masks (what the
            row costs alone).
        num_tokens_processed (`torch.LongTensor` of shape `(batch,)`): positions fed through the trunk in those
            passes (less than passes x length with `use_prefix_cache`).
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    waves: tuple[tuple[tuple[str, torch.BoolTensor], ...], ...] | None = None
    num_remasked: torch.LongTensor | None = None
    num_model_calls: torch.LongTensor | None = None
    num_tokens_processed: torch.LongTensor | None = None


class TokenSampler:
    """Draws one token per position from logits with temperature and top-p, never the mask token, and reports
    each draw's confidence: its probability under the model's plain softmax (temperature 1, no top-p)."""

    def __init__(self, temperature: float, top_p: float, mask_id: int, generator: torch.Generator | None) -> None:
        self.temperature, self.top_p, self.mask_id, self.generator = temperature, top_p, mask_id, generator

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits` `(n, vocab)` → tokens `(n,)` and confidences `(n,)`."""
        logits = logits.float().clone()
        logits[:, self.mask_id] = float("-inf")
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            filtered = top_p_filter(logits / self.temperature, self.top_p)
            tokens = torch.multinomial(filtered.softmax(dim=-1), 1, generator=self.generator).squeeze(-1)
        confidence = logits.softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, confidence

    def at(self, logits: torch.Tensor, where: torch.Tensor, fill_value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample at the positions `where` `(batch, seq)` from their logits `(where.sum(), vocab)`; returns tokens and
        confidences `(batch, seq)`, `fill_value` and 0 elsewhere."""
        tokens, confidence = self(logits)
        all_tokens = torch.full(where.shape, fill_value, dtype=torch.long, device=where.device)
        all_confidence = torch.zeros(where.shape, dtype=confidence.dtype, device=where.device)
        return all_tokens.masked_scatter(where, tokens), all_confidence.masked_scatter(where, confidence)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the smallest set of tokens whose probability reaches `top_p`."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # the token that crosses top_p is kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def ceil_div(numerator: torch.Tensor, denominator: int) -> torch.Tensor:
    """`ceil(numerator / denominator)` elementwise for non-negative integer tensors."""
    return (numerator + denominator - 1) // denominator


def top_k_per_row(scores: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean `(batch, seq)`: in each row the `k[row]` allowed positions with the highest scores (ties: lower
    position first)."""
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return allowed & (ranks < k[:, None])


__all__ = ["DiffusionGenerateOutput", "TokenSampler", "ceil_div", "top_k_per_row", "top_p_filter"]
