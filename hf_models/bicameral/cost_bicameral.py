"""What a Bicameral byte LM costs: forward FLOPs per byte and parameters per part (backbone, byte head, token head),
for the dual-head experiment's accounting."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .configuration_bicameral import BicameralConfig, next_power_of_two

if TYPE_CHECKING:
    from .modeling_bicameral import BicameralForCausalLM


def estimate_flops_per_byte(config: BicameralConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per byte of the backbone, the byte head and the token head, for windows of `seq_len` bytes.

    A multiply-add counts 2. The long convolution counts three real FFTs of `n = next_power_of_two(seq_len +
    kernel_len - 1)` points (about `2.5 n log2 n` FLOPs each) and the spectral product per channel and window,
    spread over its `seq_len` bytes (the FFT formulation: `conv_impl="dense"`, the default below `fft_min_length`,
    does `2·seq_len·hidden` per byte instead, faster on a CPU but not fewer FLOPs at long windows). Heads count their matmul plus about 5 FLOPs per class for the softmax and
    cross-entropy. Elementwise gates and norms (a few FLOPs per channel) are left out. Training costs about three
    times the forward FLOPs for every part.
    """
    seq_len = seq_len or config.max_position_embeddings
    hidden, inner = config.hidden_size, config.ffn_mult * config.hidden_size
    n = next_power_of_two(seq_len + config.kernel_len - 1)
    linear = 2 * (2 * hidden * hidden) + 2 * (2 * hidden * hidden) + 2 * (2 * hidden * inner)  # gates, cross, FFN
    fft = (3 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) * hidden / seq_len
    time_conv = 2 * config.time_kernel_size * hidden
    return {
        "backbone_linear_flops_per_byte": config.num_hidden_layers * linear,
        "backbone_fft_flops_per_byte": config.num_hidden_layers * (fft + time_conv),
        "backbone_flops_per_byte": config.num_hidden_layers * (linear + fft + time_conv),
        "byte_head_flops_per_byte": 2 * hidden * config.vocab_size + 5 * config.vocab_size,
        "token_head_flops_per_byte": 2 * hidden * config.token_vocab_size + 5 * config.token_vocab_size,
    }


def parameter_breakdown(model: BicameralForCausalLM) -> dict[str, int]:
    """Parameters of the backbone, the byte head (not counted again when tied) and the token head."""
    backbone = sum(p.numel() for p in model.model.parameters())
    byte_head = sum(p.numel() for p in model.lm_head.parameters()) - (
        model.lm_head.weight.numel() if model.lm_head.weight is model.model.embed_tokens.weight else 0)
    token_head = sum(p.numel() for p in model.token_head.parameters()) if model.token_head is not None else 0
    return {"backbone": backbone, "byte_head": byte_head, "token_head": token_head,
            "total": backbone + byte_head + token_head}


__all__ = ["estimate_flops_per_byte", "parameter_breakdown"]
