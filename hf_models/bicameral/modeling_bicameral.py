"""The Bicameral FFT byte language model (seed 000) with an optional dual (byte + BPE-token) head.

Notation: `x` is a block's normalised input `(batch, seq, hidden)`, `C = hidden_size`, `K = kernel_len`, `N =
fft_size` (the frequency grid, see `BicameralConfig`), `m_t` the padding mask (1 for a real byte).

Block (pre-norm), for `h` the residual stream and `x = LayerNorm(h) * m`:

* Context: `p_t = sum_{s<=t} x_s / max(1, sum_{s<=t} m_s)`, the causal running mean (`context_pooling="causal"`;
  the original used the mean over the whole window, `"global"`, which leaks future bytes).
* Frequency path ("right brain"): one learned kernel `k` of `K` taps shared by all channels. Its spectrum on the
  grid, `rfft(k, N)`, is multiplied by per-bin gates `sigmoid(g_f)` and by the cutoff mask `M_f` (1 below
  `cutoff - transition_bins`, a raised cosine from 1 to 0 over the last `transition_bins` bins below `cutoff`, 0 from
  `cutoff` on); the inverse transform truncated to its first `K` taps is the effective causal kernel `k_eff`.
  Then `y_f[t, c] = gain_c * sigmoid(W_f p_t + b_f)_c * sum_{j<K} k_eff[j] x[t - j, c]`, the convolution evaluated
  with zero-padded FFTs (exact linear convolution: no wrap-around, so nothing leaks from the future). The original
  multiplied the *signal's* spectrum by the gates and mask (`spectral_gating="signal"`, plus an optional learned
  phase rotation `exp(i phi[f, c])`): a two-sided filter whose output at `t` depends on inputs after `t`.
* Time path ("left brain"): a depthwise causal convolution of width `time_kernel_size`,
  `y_t[t, c] = sigmoid(W_t p_t + b_t)_c * (b_c + sum_j w[c, j] x[t - w + 1 + j, c])`.
* Fusion: `a_f, a_t = sigmoid(alpha_f), sigmoid(alpha_t)`; `y = a_f/(a_f + a_t) y_f + a_t/(a_f + a_t) y_t +
  0.1 * W_x [y_f; y_t]`; `h <- h + dropout(y)`; `h <- h + dropout(FFN(LayerNorm(h)))`, FFN `C -> ffn_mult C -> C`
  with GELU.

Heads on the final LayerNorm: the byte head (`lm_head`, `C -> vocab_size` with bias; position `t` predicts byte
`t + chunk_size`) and, if `token_vocab_size > 0`, the token head (`token_head`, `C -> token_vocab_size` with bias;
position `t` predicts the teacher-BPE token that covers byte `t`). The token head is computed only when asked for.

A whole sequence is convolved with the long kernel by zero-padded FFTs or, below `fft_min_length` positions, as a
lower-triangular Toeplitz matrix product (`conv_impl`; exact, and faster on a CPU at short lengths).

Cached decoding: with the kernel limited to `K` taps, a step needs per layer only the last `max(K,
time_kernel_size)` inputs `x` (a ring buffer), and the running sum and count of the context mean: each step costs
`O(layers * K * C)`, whatever the position. Prefill (and any multi-byte step) uses the sequence path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ..modeling_zoo_common import (
    ZooDropout,
    ZooPreTrainedModel,
    ZooStateCacheGenerationMixin,
    dense_causal_conv,
    few_rows_linear,
    fft_causal_conv,
)
from .cache_bicameral import BicameralCache, work_dtype
from .configuration_bicameral import BicameralConfig
from .cost_bicameral import estimate_flops_per_byte, parameter_breakdown

FUSION_CROSS_SCALE = 0.1  # the original's fixed weight of the cross-hemisphere projection


def cutoff_mask(num_bins: int, cutoff: int | None, transition_bins: int, *, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The curriculum's low-pass mask over `num_bins` frequency bins, shape `(num_bins,)`.

    1 below `cutoff - t`, a raised cosine falling from 1 (bin `cutoff - t`) to 0 (bin `cutoff - 1`) over
    `t = min(transition_bins, cutoff)` bins, 0 from `cutoff` on; all ones when `cutoff` is `None` or `>= num_bins`.
    """
    mask = torch.ones(num_bins, device=device, dtype=dtype)
    if cutoff is None or cutoff >= num_bins:
        return mask
    width = min(transition_bins, cutoff)
    if width > 0:
        ramp = torch.linspace(0.0, 1.0, steps=width, device=device, dtype=dtype)
        mask[cutoff - width:cutoff] = 0.5 * (1.0 + torch.cos(math.pi * ramp))
    mask[cutoff:] = 0.0
    return mask


def direct_causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same convolution as `fft_causal_conv` (shared kernel), computed directly in `O(seq * K)` (reference for tests)."""
    taps = kernel.shape[0]
    padded = F.pad(x.transpose(1, 2), (taps - 1, 0))  # (batch, channels, taps - 1 + seq)
    weight = kernel.flip(0).to(x.dtype).expand(x.shape[-1], 1, taps)
    return F.conv1d(padded, weight, groups=x.shape[-1]).transpose(1, 2)


class BicameralBlock(GradientCheckpointingLayer):
    """One bicameral block: causal long convolution (frequency path) + short convolution (time path), fused, then
    a feed-forward network, each on a pre-norm residual branch. See the module docstring for the math. Under
    gradient checkpointing (training) the block is recomputed in the backward pass and runs without a cache."""

    def __init__(self, config: BicameralConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        hidden, bins = config.hidden_size, config.num_freq_bins
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        # frequency path
        self.kernel = nn.Parameter(torch.empty(config.kernel_len))
        self.spectral_gain = nn.Parameter(torch.empty(hidden))
        self.freq_gate_logits = nn.Parameter(torch.empty(bins))
        self.freq_context_gate = nn.Linear(hidden, hidden)
        self.phase = nn.Parameter(torch.empty(bins, hidden)) if config.phase_activation else None
        # time path
        self.time_conv = nn.Conv1d(hidden, hidden, config.time_kernel_size, groups=hidden)
        self.time_context_gate = nn.Linear(hidden, hidden)
        # fusion
        self.alpha_freq = nn.Parameter(torch.empty(1))  # (1,), not 0-d: FSDP2 shards no scalars
        self.alpha_time = nn.Parameter(torch.empty(1))
        self.cross_mix = nn.Linear(2 * hidden, hidden)
        # feed-forward
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_up = nn.Linear(hidden, config.ffn_mult * hidden)
        self.ffn_down = nn.Linear(config.ffn_mult * hidden, hidden)
        self.dropout = ZooDropout(config.dropout)
        # the original's initialisations (read by `BicameralPreTrainedModel._init_weights`)
        for gate in (self.freq_context_gate, self.time_context_gate):
            gate.init_std, gate.init_bias = 0.0, 2.0  # gates start at sigmoid(2) ~ 0.88 everywhere
        for layer in (self.time_conv, self.cross_mix, self.ffn_up, self.ffn_down):
            layer.init_std = 0.01
        self._tables_memo: tuple[tuple, dict[str, torch.Tensor]] | None = None  # see `decode_tables`

    def spectral_filter(self) -> torch.Tensor:
        """Per-bin gains `sigmoid(g_f) * M_f` on the grid, `(num_freq_bins,)` (at least float32)."""
        config, work = self.config, work_dtype(self.kernel.dtype)
        mask = cutoff_mask(config.num_freq_bins, config.cutoff, config.transition_bins,
                           device=self.kernel.device, dtype=work)
        return torch.sigmoid(self.freq_gate_logits.to(work)) * mask

    def effective_kernel(self) -> torch.Tensor:
        """The causal kernel `k_eff` `(kernel_len,)`: the gated, low-passed kernel spectrum back in time, first
        `kernel_len` taps (everything the grid's inverse transform puts after them is dropped)."""
        size = self.config.fft_size
        spectrum = torch.fft.rfft(self.kernel.to(work_dtype(self.kernel.dtype)), n=size) * self.spectral_filter()
        return torch.fft.irfft(spectrum, n=size)[: self.config.kernel_len]

    def _long_conv(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """`sum_{j<K} kernel[j] x[t - j]` over a sequence `(batch, seq, hidden)`, by FFTs or a Toeplitz matrix
        product (`config.conv_impl`; the same numbers up to rounding)."""
        impl = self.config.conv_impl
        if impl == "fft" or (impl == "auto" and x.shape[1] >= self.config.fft_min_length):
            return fft_causal_conv(x, kernel)
        return dense_causal_conv(x, kernel)

    def _signal_gated_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The original's frequency path (`spectral_gating="signal"`): gates, phase and mask on the product of the
        spectra; not causal."""
        size = self.config.fft_size
        if x.shape[1] + self.config.kernel_len - 1 > size:
            raise ValueError(f"spectral_gating='signal' supports at most max_position_embeddings="
                             f"{self.config.max_position_embeddings} bytes, got {x.shape[1]}")
        work = work_dtype(x.dtype)
        kernel_spectrum = torch.fft.rfft(self.kernel.to(work), n=size) * self.spectral_filter()
        spectrum = torch.fft.rfft(x.to(work), n=size, dim=1) * kernel_spectrum[None, :, None]
        if self.phase is not None:
            phase = self.phase.to(work)
            spectrum = spectrum * torch.polar(torch.ones_like(phase), phase)[None]
        return torch.fft.irfft(spectrum, n=size, dim=1)[:, : x.shape[1]].to(x.dtype)

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor, cache: BicameralCache | None = None
    ) -> torch.Tensor:
        """Args:
            hidden_states: `(batch, seq, hidden)`, the residual stream of the new positions.
            mask: `(batch, seq)`, 1 for real bytes, 0 for padding (padding contributes nothing to other positions).
            cache: the decoding state; `seq` new positions follow the `cache.seen_tokens` already seen.
        """
        if cache is not None and hidden_states.shape[1] == 1 and self.config.spectral_gating == "kernel":
            return self._decode_step(hidden_states, mask, cache)
        x = self.norm(hidden_states) * mask[..., None].to(hidden_states.dtype)
        length = x.shape[1]
        context = self._context(x, mask, cache)

        if self.config.spectral_gating == "signal":
            long_conv = self._signal_gated_conv(x)
        else:
            kernel = self.effective_kernel() if cache is None else self.decode_tables(cache)["kernel"]
            if cache is None or cache.seen_tokens == 0:
                window = x
            else:  # continuing a cached sequence: the last inputs are the convolution's left context
                window = torch.cat([cache.past_inputs(self.layer_idx, cache.ring - 1), x], dim=1)
            long_conv = self._long_conv(window, kernel)[:, -length:]
        gated_freq = long_conv * torch.sigmoid(self.freq_context_gate(context))  # y_f without the spectral gain

        width = self.config.time_kernel_size
        past = cache.past_inputs(self.layer_idx, width - 1) if cache is not None else x.new_zeros(
            x.shape[0], width - 1, x.shape[2])
        y_time = self._time_conv(torch.cat([past, x], dim=1)) * torch.sigmoid(self.time_context_gate(context))

        if cache is not None:
            cache.store_inputs(self.layer_idx, x)

        weight, bias = self.fusion()
        mixed = F.linear(torch.cat([gated_freq, y_time], dim=-1), weight, bias)
        hidden_states = hidden_states + self.dropout(mixed)
        ffn = self.ffn_down(self.dropout(F.gelu(self.ffn_up(self.ffn_norm(hidden_states)))))
        return hidden_states + self.dropout(ffn)

    def _time_conv(self, window: torch.Tensor) -> torch.Tensor:
        """The time path's depthwise causal convolution `b_c + sum_j w[c, j] x[t - w + 1 + j, c]` of `window`
        `(batch, w - 1 + seq, hidden)` (the `w - 1` inputs before the sequence, then the sequence) → `(batch, seq,
        hidden)`: `time_conv`'s weights as `w` multiply-adds of shifted windows, which in the batch-first layout
        need no transposed copies (about 5x faster on a CPU than `nn.Conv1d` forward and backward at width 3)."""
        taps = self.time_conv.weight[:, 0, :]  # (hidden, w)
        width, length = taps.shape[1], window.shape[1] - taps.shape[1] + 1
        out = torch.addcmul(self.time_conv.bias, window[:, :length], taps[:, 0])
        for j in range(1, width):
            out = torch.addcmul(out, window[:, j:j + length], taps[:, j])
        return out

    def fusion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole fusion as one linear map of `[y_f / gain; y_t]` (`2C → C`): `a_f/(a_f + a_t)·y_f +
        a_t/(a_f + a_t)·y_t + 0.1·W_x[y_f; y_t]` with the spectral gain folded into the `y_f` columns; returns the
        weight `(C, 2C)` and the bias `(C,)`."""
        hidden = self.config.hidden_size
        a_freq, a_time = torch.sigmoid(self.alpha_freq), torch.sigmoid(self.alpha_time)
        total = a_freq + a_time + 1e-8
        eye = torch.eye(hidden, device=self.cross_mix.weight.device, dtype=self.cross_mix.weight.dtype)
        weight = FUSION_CROSS_SCALE * self.cross_mix.weight + torch.cat([(a_freq / total) * eye,
                                                                         (a_time / total) * eye], dim=1)
        weight = torch.cat([weight[:, :hidden] * self.spectral_gain, weight[:, hidden:]], dim=1)
        return weight, FUSION_CROSS_SCALE * self.cross_mix.bias

    def _context(self, x: torch.Tensor, mask: torch.Tensor, cache: BicameralCache | None) -> torch.Tensor:
        """The context gates' input: `(batch, seq, hidden)` (causal running mean) or `(batch, 1, hidden)` (global)."""
        if self.config.context_pooling == "global":
            return (x.sum(1, keepdim=True) / mask.sum(1).clamp(min=1)[:, None, None].to(x.dtype))
        if cache is not None:
            return cache.update_context(self.layer_idx, x, mask)
        work = work_dtype(x.dtype)
        counts = torch.cumsum(mask.to(work), dim=1).clamp(min=1.0)[..., None]
        return (torch.cumsum(x.to(work), dim=1) / counts).to(x.dtype)

    def decode_tables(self, cache: BicameralCache) -> dict[str, torch.Tensor]:
        """What decoding derives from the weights, built once per weights and cutoff (afresh with gradients enabled):
        `kernel` k_eff `(K,)`; `long_taps` `(R, R)` with `long_taps[t % R, s] = k_eff[(t − s) % R]` (0 from lag K
        on), the weights of ring slot s at position t (R = `cache.ring`); `time_offsets` `(w,)` (the positions
        `t − w + 1 ... t` the time path reads); `gate_weight` / `gate_bias`, both context gates as one linear map
        `C → 2C`; `fusion_weight` `(C, 2C)` / `fusion_bias`, the whole fusion
        (`fusion`) as one linear map of `[long_conv · gate_f; time_conv · gate_t]`. A later cache reuses them
        while no parameter of the block changed (an optimiser step, `load_state_dict` or `.to()` does change them;
        an in-place write through `.data` bypasses autograd's version counter and is not seen)."""
        cutoff, tables = cache.kernels.get(self.layer_idx, (None, None))
        if tables is not None and cutoff == self.config.cutoff and not torch.is_grad_enabled():
            return tables
        # the same weights and cutoff as an earlier cache's (the parameters' versions count in-place updates)
        key = (self.config.cutoff, cache.ring, tuple((p._version, p.data_ptr()) for p in self.parameters()))
        if self._tables_memo is not None and self._tables_memo[0] == key and not torch.is_grad_enabled():
            cache.kernels[self.layer_idx] = (self.config.cutoff, self._tables_memo[1])
            return self._tables_memo[1]
        kernel, ring = self.effective_kernel(), cache.ring
        slots = torch.arange(ring, device=kernel.device)
        long_taps = F.pad(kernel, (0, ring - kernel.shape[0]))[(slots[:, None] - slots[None, :]) % ring]
        fusion, fusion_bias = self.fusion()
        width = self.config.time_kernel_size
        tables = {
            "kernel": kernel, "long_taps": long_taps.to(self.cross_mix.weight.dtype),
            "time_offsets": torch.arange(width, device=kernel.device) - (width - 1),
            "gate_weight": torch.cat([self.freq_context_gate.weight, self.time_context_gate.weight]),
            "gate_bias": torch.cat([self.freq_context_gate.bias, self.time_context_gate.bias]),
            "fusion_weight": fusion, "fusion_bias": fusion_bias,
        }
        if not torch.is_grad_enabled():
            cache.kernels[self.layer_idx] = (self.config.cutoff, tables)
            self._tables_memo = (key, tables)
        return tables

    def _decode_step(self, hidden_states: torch.Tensor, mask: torch.Tensor, cache: BicameralCache) -> torch.Tensor:
        """One new byte `(batch, 1, hidden)` at the tensor position `cache.cache_position`: the same block as
        `forward`, from the ring buffer and the fused tables of `decode_tables`, writing the state in place (no
        shape or Python value depends on the position, so it compiles to one graph). O(R·C + C²) per layer."""
        tables = self.decode_tables(cache)
        x = self.norm(hidden_states) * mask[..., None].to(hidden_states.dtype)
        ring = cache.get_state(self.layer_idx, "inputs")
        slot = cache.cache_position % cache.ring
        ring.index_copy_(1, slot, x)
        total, count = cache.get_state(self.layer_idx, "context_sum"), cache.get_state(self.layer_idx, "context_count")
        total.add_(x[:, 0].to(total.dtype))
        count.add_(mask.to(count.dtype))
        context = (total / count.clamp(min=1.0)).to(x.dtype)[:, None]
        long_conv = torch.matmul(tables["long_taps"].index_select(0, slot), ring)  # (batch, 1, hidden)
        window = ring.index_select(1, (cache.cache_position + tables["time_offsets"]) % cache.ring)
        time_conv = self._time_conv(window)  # (batch, 1, hidden)
        gate_freq, gate_time = torch.sigmoid(F.linear(context, tables["gate_weight"], tables["gate_bias"])).chunk(2, -1)
        mixed = F.linear(torch.cat([long_conv * gate_freq, time_conv * gate_time], dim=-1), tables["fusion_weight"],
                         tables["fusion_bias"])
        hidden_states = hidden_states + self.dropout(mixed)
        ffn = self.ffn_down(self.dropout(F.gelu(self.ffn_up(self.ffn_norm(hidden_states)))))
        return hidden_states + self.dropout(ffn)


@dataclass
class BicameralCausalLMOutput(ModelOutput):
    """Output of [`BicameralForCausalLM`].

    Args:
        loss (`torch.FloatTensor`, *optional*): byte cross-entropy (position `t` against byte `t + chunk_size`),
            when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch, seq, vocab_size)`): byte-head scores.
        token_loss (`torch.FloatTensor`, *optional*): token-head cross-entropy (position `t` against the teacher
            token covering byte `t`; -100 ignored), when `token_labels` are given.
        token_logits (`torch.FloatTensor` of shape `(batch, seq, token_vocab_size)`, *optional*): token-head scores,
            only when `return_token_logits=True` or `token_labels` are given.
        cache (`BicameralCache`, *optional*): the decoding state, when `use_cache=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the embeddings and each block's output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    token_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class BicameralPreTrainedModel(ZooPreTrainedModel):
    config_class = BicameralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BicameralBlock"]
    _can_record_outputs = {"hidden_states": BicameralBlock}

    def _init_weights(self, module: nn.Module) -> None:
        # The original's small initialisations: kernel N(0, 1e-3), convolution / fusion / FFN N(0, 0.01), context
        # gates zero weights with bias 2; embeddings and heads N(0, initializer_range).
        std = self.config.initializer_range
        if isinstance(module, BicameralBlock):
            init.normal_(module.kernel, mean=0.0, std=1e-3)
            init.ones_(module.spectral_gain)
            init.constant_(module.freq_gate_logits, 2.0)
            init.constant_(module.alpha_freq, 0.5)
            init.constant_(module.alpha_time, 0.5)
            if module.phase is not None:
                init.zeros_(module.phase)
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            layer_std = getattr(module, "init_std", std)
            if layer_std == 0:
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=layer_std)
            if module.bias is not None:
                init.constant_(module.bias, getattr(module, "init_bias", 0.0))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class BicameralModel(BicameralPreTrainedModel):
    """The Bicameral backbone: byte ids → final normalised hidden states `(batch, seq, hidden)`."""

    def __init__(self, config: BicameralConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BicameralBlock(config, index) for index in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def set_cutoff(self, cutoff: int | None) -> None:
        """Change the frequency path's cutoff (bins; `None` = all) for every layer: the config holds it."""
        self.config.cutoff = self.config.validate_cutoff(cutoff)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BicameralCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args:
            input_ids: `(batch, seq)` byte ids (new positions only when a `cache` is given).
            attention_mask: `(batch, seq)` or `(batch, past + seq)`, 1 for real bytes, 0 for (left) padding.
            cache: a `BicameralCache` from a previous call (the model creates one when `use_cache=True`).
            inputs_embeds: `(batch, seq, hidden)` instead of `input_ids`.
            use_cache: return the decoding state (default `config.use_cache` in eval mode, off in training mode and
                for the leaky variants).
            output_hidden_states: also return the embeddings and every block's output, the last one normalised
                (keyword or config field, as in Llama).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        if not self.config.is_causal:
            if cache is not None or use_cache:
                raise ValueError(
                    "This configuration is not causal (context_pooling='global', spectral_gating='signal' or "
                    "phase_activation): every output depends on later bytes, so a cache would replay a different "
                    "model than the one trained. Generate with use_cache=False.")
            use_cache = False
        if use_cache is None:  # the config's default builds a decoding state in eval mode only, never in training
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # checkpointed blocks run without a cache
        if use_cache and cache is None:
            cache = BicameralCache(self.config, batch, hidden_states.device, hidden_states.dtype)
        if not use_cache:
            cache = None
        compiled_step = torch.compiler.is_compiling()  # reads no Python count (checked by the eager prefill)
        if cache is not None and not compiled_step:
            cache.check_cutoff(self.config.cutoff)
        if attention_mask is None:
            mask = hidden_states.new_ones(batch, length)
        else:
            mask = attention_mask[:, -length:].to(hidden_states.dtype)

        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, cache=cache)
        if cache is not None:
            cache.advance_count(length, in_python=not compiled_step)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class BicameralForCausalLM(BicameralPreTrainedModel, ZooStateCacheGenerationMixin, GenerationMixin):
    """Bicameral backbone + byte head (+ optional token head for the dual loss, see `training.dual_head`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = False  # the loss is a per-batch mean: the Trainer scales it for gradient accumulation

    def __init__(self, config: BicameralConfig) -> None:
        super().__init__(config)
        self.model = BicameralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.token_head = nn.Linear(config.hidden_size, config.token_vocab_size) if config.token_vocab_size else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_cutoff(self, cutoff: int | None) -> None:
        """Change the frequency path's cutoff (bins; `None` = all), e.g. from the curriculum callback."""
        self.model.set_cutoff(cutoff)

    def remove_token_head(self) -> None:
        """Delete the token head (it only serves training): byte logits are unchanged, the saved model is smaller,
        and `config.token_vocab_size` becomes 0."""
        self.token_head = None
        self.config.token_vocab_size = 0

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BicameralCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_token_logits: bool = False,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> BicameralCausalLMOutput:
        """Args:
            labels: `(batch, seq)` byte ids; position `t` is scored against `labels[:, t + chunk_size]` (-100
                ignored), like `input_ids` shifted inside the model. A pre-shifted `shift_labels` keyword (`(batch,
                seq)`, position `t`'s target at `t`), as the Trainer passes under context parallelism, wins.
            token_labels: `(batch, seq)` teacher-token ids of the byte at each position (-100 ignored); the token
                head's cross-entropy is returned as `token_loss` (the weighting is the trainer's).
            return_token_logits: also compute the token head's scores (never computed otherwise).
            logits_to_keep: score only the last `logits_to_keep` positions (0: all).
            Other arguments: see [`BicameralModel.forward`].
        """
        if logits_to_keep and (labels is not None or token_labels is not None):
            raise ValueError("`labels` / `token_labels` score every position: pass them without `logits_to_keep`")
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = few_rows_linear(self.lm_head, hidden)

        loss = None
        if labels is not None:
            if shift_labels is None:
                shift = self.config.chunk_size
                shift_labels = F.pad(labels[:, shift:], (0, shift), value=-100)
            loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels,
                                      vocab_size=self.config.vocab_size)

        token_logits = token_loss = None
        if return_token_logits or token_labels is not None:
            if self.token_head is None:
                raise ValueError("this model has no token head (token_vocab_size=0)")
            token_logits = self.token_head(hidden)
            if token_labels is not None:
                token_loss = F.cross_entropy(token_logits.reshape(-1, token_logits.shape[-1]).float(),
                                             token_labels.reshape(-1).to(token_logits.device), ignore_index=-100)
        return BicameralCausalLMOutput(loss=loss, logits=logits, token_loss=token_loss, token_logits=token_logits,
                                       cache=outputs.cache, hidden_states=outputs.hidden_states)

    def _state_cache_for_generation(self, generation_config, batch_size: int) -> BicameralCache | None:
        """The [`BicameralCache`] `generate` starts from (none for the non-causal variants, which refuse one). With a
        `compile_config` or `cache_implementation="static"` it is compileable, so `generate` runs the decode steps
        through `torch.compile` (on a CPU only with `compile_config._compile_all_devices = True`, as for transformers'
        `StaticCache`); otherwise decoding stays eager, also on CUDA."""
        if not self.config.is_causal:
            return None
        compileable = generation_config.compile_config is not None or generation_config.cache_implementation == "static"
        return BicameralCache(self.config, batch_size, self.device, self.dtype, compileable=compileable)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs):
        if self.config.chunk_size != 1:
            raise ValueError(f"this model predicts byte t + {self.config.chunk_size} at position t "
                             f"(chunk_size={self.config.chunk_size}): use generate_chunks, not generate")
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    @torch.no_grad()
    def generate_chunks(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Generate `chunk_size` bytes per forward pass, as the seed's chunk objective does: the last `chunk_size`
        positions predict the next `chunk_size` bytes.

        Args:
            input_ids: `(batch, seq)` prompt, at least `chunk_size` bytes, no padding.
            max_new_tokens: bytes to add (the last chunk is cut to fit).
            do_sample / temperature / top_k: greedy by default, else sampling from the (top-k) softmax.
            use_cache: feed only the new chunk to the cached state instead of the whole sequence.
            generator: random generator for sampling.

        Returns:
            `(batch, seq + max_new_tokens)`.
        """
        chunk = self.config.chunk_size
        if input_ids.shape[1] < chunk:
            raise ValueError(f"the prompt needs at least chunk_size={chunk} bytes, got {input_ids.shape[1]}")
        sequences, feed, cache = input_ids, input_ids, None
        while sequences.shape[1] - input_ids.shape[1] < max_new_tokens:
            outputs = self(input_ids=feed, cache=cache, use_cache=use_cache)
            scores = outputs.logits[:, -chunk:].float()
            if do_sample:
                scores = scores / temperature
                if top_k:
                    threshold = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
                    scores = scores.masked_fill(scores < threshold, float("-inf"))
                probabilities = scores.softmax(-1).reshape(-1, scores.shape[-1])
                new = torch.multinomial(probabilities, 1, generator=generator).reshape(scores.shape[:2])
            else:
                new = scores.argmax(-1)
            new = new[:, : max_new_tokens - (sequences.shape[1] - input_ids.shape[1])]
            sequences = torch.cat([sequences, new], dim=1)
            cache = outputs.cache if use_cache else None
            feed = new if use_cache else sequences
        return sequences


__all__ = [
    "BicameralBlock",
    "BicameralCache",
    "BicameralCausalLMOutput",
    "BicameralForCausalLM",
    "BicameralModel",
    "BicameralPreTrainedModel",
    "cutoff_mask",
    "direct_causal_conv",
    "estimate_flops_per_byte",
    "fft_causal_conv",
    "parameter_breakdown",
]
