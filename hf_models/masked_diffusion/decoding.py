"""Decoders of the masked diffusion LM beyond naive and wavefront un-masking: left-to-right, confidence-threshold
parallel decoding (Fast-dLLM) and block-wise decoding with an approximate key/value cache. Reached through
`MaskedDiffusionForMaskedLM.diffusion_generate(sampler=..., threshold=..., block_size=..., use_prefix_cache=...)`.

All of them run the trunk, read the main head's logits at the masked positions of the active block and draw a token
at each (temperature, top-p; never [MASK]) with its confidence c_i, the drawn token's probability under the plain
softmax (the maximum probability when greedy). They differ in which draws are committed at a step:

* `left_to_right`: the k leftmost masked positions, k = ceil(masked / steps left) (one per step by default, so
  `steps = max_new_tokens` is autoregressive order with a bidirectional trunk); only those are drawn, there is no
  selection among draws (unlike naive, which commits the k most confident of all draws: best-of-N);
* `threshold`: every masked position with c_i >= tau, and the most confident one when none reaches tau, so each
  step commits at least one token and the number of trunk passes is at most the number of tokens; tau > 1 is one
  (the most confident) token per step;
* `naive` with `block_size`: LLaDA's semi-autoregressive schedule, `steps / blocks` steps per block, the
  k = ceil(masked in block / steps left in block) most confident draws.

Blocks (`block_size` b): the new tokens are filled b at a time, left to right; a block's steps run until it is
full, and only its positions are drawn; the later blocks stay [MASK] and are seen by the trunk as such.

Cache (`use_prefix_cache`; Fast-dLLM's "dual cache"): at a block's first step the trunk runs on the whole sequence
and the keys/values of every layer at the positions outside the block (the prompt, the finished blocks and the
masked suffix) are kept; the block's later steps run the trunk on the block's b positions only, attending to the
kept keys/values and the block's fresh ones. Exactly what is approximate: the kept keys/values of layers >= 1 are
functions (through bidirectional attention) of the whole sequence as it was at the block's first step, so they do
not see the tokens the block commits afterwards; layer 0's are exact (the tokens outside the block do not change
during the block). The block's own positions are exact given that context. `cache_refresh_every=r` recomputes the
whole sequence every r-th step of a block (r = 1: every step, identical to decoding without the cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

from .configuration_masked_diffusion import MaskedDiffusionConfig
from .sampling import DiffusionGenerateOutput, TokenSampler, ceil_div, top_k_per_row

if TYPE_CHECKING:
    from .modeling_masked_diffusion import MaskedDiffusionForMaskedLM

DEFAULT_THRESHOLD = 0.9
BLOCK_SAMPLERS = ("naive", "threshold")


def check_decoding_options(
    config: MaskedDiffusionConfig,
    *,
    sampler: str,
    steps: int | None,
    max_new_tokens: int,
    use_critic: bool,
    threshold: float | None,
    block_size: int | None,
    use_prefix_cache: bool,
    cache_refresh_every: int | None,
) -> bool:
    """Validate the options of this module's decoders (`sampler` already resolved from "auto", `steps` as the
    user passed it) and say whether `decode` handles the call.

    Raises:
        ValueError: an option the sampler does not take, or a value out of range.
    """
    if sampler == "threshold":
        if steps is not None:
            raise ValueError("sampler='threshold' decides the number of steps itself (each commits every mask above "
                             "`threshold`, at least one): leave `steps` unset")
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"threshold must be a positive number (above 1: one token per step), got {threshold!r}")
    elif threshold is not None:
        raise ValueError(f"threshold only applies to sampler='threshold', not sampler={sampler!r}")
    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 1 or max_new_tokens % block_size:
            raise ValueError(f"block_size must be a positive integer dividing max_new_tokens={max_new_tokens}, got "
                             f"{block_size!r}")
        blocks = max_new_tokens // block_size
        if sampler == "naive" and steps is not None and steps % blocks:
            raise ValueError(f"with sampler='naive' and block_size={block_size}, steps must be a multiple of the "
                             f"{blocks} blocks, got {steps}")
    if cache_refresh_every is not None:
        if not use_prefix_cache:
            raise ValueError("cache_refresh_every only applies with use_prefix_cache=True")
        if not isinstance(cache_refresh_every, int) or cache_refresh_every < 1:
            raise ValueError(f"cache_refresh_every must be a positive integer, got {cache_refresh_every!r}")
    if use_prefix_cache and config.attention_type != "bidirectional":
        raise ValueError("use_prefix_cache caches keys/values on both sides of the active block: it needs "
                         f"config.attention_type='bidirectional', got {config.attention_type!r}")
    if (block_size is not None or use_prefix_cache) and sampler not in BLOCK_SAMPLERS:
        raise ValueError(f"block_size and use_prefix_cache apply to the samplers {BLOCK_SAMPLERS}, not {sampler!r}")
    use_decoder = sampler in ("left_to_right", "threshold") or block_size is not None or use_prefix_cache
    if use_decoder and use_critic:
        raise ValueError(f"use_critic applies to the naive and wavefront samplers without blocks or cache, not "
                         f"sampler={sampler!r} with block_size={block_size!r}, use_prefix_cache={use_prefix_cache!r}")
    return use_decoder


def decode(
    model: MaskedDiffusionForMaskedLM,
    x: torch.LongTensor,
    *,
    valid: torch.Tensor,
    position_ids: torch.LongTensor,
    prompt_length: int,
    sampler: str,
    steps: int,
    sample: TokenSampler,
    threshold: float | None,
    block_size: int | None,
    use_prefix_cache: bool,
    cache_refresh_every: int | None,
    output_history: bool,
) -> DiffusionGenerateOutput:
    """Fill the [MASK]s of `x` after `prompt_length` with the decoder `sampler` (see the module docstring).

    Args:
        model: the masked diffusion LM.
        x: `(batch, seq)` prompts followed by [MASK]s.
        valid: `(batch, seq)` real positions (not padding).
        position_ids: `(batch, seq)` rotary positions.
        prompt_length: where the [MASK]s start.
        sampler: `"left_to_right"`, `"threshold"` or `"naive"`.
        steps: trunk passes for left-to-right and naive (split evenly over the blocks); unused by threshold.
        sample: the token sampler (temperature, top-p, generator).
        threshold, block_size, use_prefix_cache, cache_refresh_every, output_history: as in `diffusion_generate`.

    Returns:
        A [`DiffusionGenerateOutput`] with the model calls and processed positions per row.
    """
    mask_id = model.config.mask_token_id
    batch, total = x.shape
    tau = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    size = block_size or total - prompt_length
    starts = range(prompt_length, total, size)
    steps_per_block = steps // len(starts)
    attention_mask = valid.long()
    calls = torch.zeros(batch, dtype=torch.long, device=x.device)
    processed = torch.zeros_like(calls)
    history = []
    for start in starts:
        end = start + size
        outside = torch.cat((torch.arange(start, device=x.device), torch.arange(end, total, device=x.device)))
        context = None
        step = 0
        while bool((x[:, start:end] == mask_id).any()):
            fillable = x[:, start:end] == mask_id
            active = fillable.any(dim=1)
            if context is None or (cache_refresh_every is not None and step % cache_refresh_every == 0):
                cache = DynamicCache() if use_prefix_cache else None
                logits = model(input_ids=x, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache).logits[:, start:end]
                if use_prefix_cache:
                    context = _context_cache(cache, outside)
                processed += total * active
            else:
                logits = model(input_ids=x[:, start:end], position_ids=position_ids[:, start:end],
                               attention_mask=torch.cat((attention_mask[:, outside], attention_mask[:, start:end]), 1),
                               cache=context).logits
                context.crop(start - end)  # drop the block's keys/values again
                processed += size * active
            calls += active
            block = x[:, start:end]
            if sampler == "left_to_right":
                budget = ceil_div(fillable.sum(dim=1), steps_per_block - step)
                leftmost = -torch.arange(size, device=x.device, dtype=torch.float).expand(batch, size)
                chosen = top_k_per_row(leftmost, fillable, budget)
                tokens, _ = sample.at(logits[chosen], chosen, fill_value=mask_id)
            else:
                tokens, confidence = sample.at(logits[fillable], fillable, fill_value=mask_id)
                if sampler == "threshold":
                    most_confident = top_k_per_row(confidence, fillable, torch.ones_like(calls))
                    chosen = fillable & (confidence >= tau) | most_confident
                else:
                    chosen = top_k_per_row(confidence, fillable,
                                            ceil_div(fillable.sum(dim=1), steps_per_block - step))
            x = x.clone()
            x[:, start:end] = torch.where(chosen, tokens, block)
            step += 1
            if output_history:
                history.append(x.clone())
    if bool((x == mask_id).any()):
        raise RuntimeError("internal error: masks remain after the last block")
    return DiffusionGenerateOutput(
        sequences=x, history=tuple(history) if output_history else None,
        num_remasked=torch.zeros_like(calls), num_model_calls=calls, num_tokens_processed=processed,
    )


def _context_cache(cache: DynamicCache, positions: torch.Tensor) -> DynamicCache:
    """A cache holding only the keys/values of `positions` `(n,)` of every layer of `cache`."""
    return DynamicCache(ddp_cache_data=[(keys[:, :, positions], values[:, :, positions])
                                        for keys, values, _ in cache])


__all__ = ["check_decoding_options", "decode"]
