"""The multi-head Toeplitz mixer language model (seed 001, "Experiment 010") as a Hugging Face model.

Notation: B batch, T tokens in this call, S = `max_position_embeddings` (kernel length, hard context), E =
`hidden_size`, H = `num_heads`, D = E / H, F = `intermediate_size`, L = `num_hidden_layers`.

Model (pre-norm residual stack, no positional embedding: position enters only through the kernels, the mean
normaliser and the per-position bias of the mixers):

    x = Emb[input_ids]                                        (B, T, E)
    for each block:  x = x + Mixer(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = W_lm · RMSNorm(x)                                (B, T, V), W_lm untied
    MLP(z) = fc2(Dropout(GELU_tanh(fc1(z))))

Mixer (one block), per head h owning the channels [h·D, (h+1)·D):

    p   = W_in · u + b_in          (if `do_toep_proj`, else p = u)
    k_h = softplus(w_h) or w_h     (`kernel_param`), a length-S kernel per head shared by its D channels
    y_t = Σ_{s ≤ t} k_h[t − s] · p_s                                   a causal convolution
    y_t = y_t / c_h[t],  c_h[t] = Σ_{m ≤ t} k_h[m]                      (if `do_toep_mean`)
    y_t = y_t + β_h[t]                                                   per-position bias, init 0
    o   = W_out · y                (if `do_toep_proj`, no bias)

The product is computed as a Toeplitz matrix `M_h[t, s] = k_h[t − s]` (s ≤ t) times p (`mixer_impl="dense"`)
or as an FFT convolution in float32 (`"fft"`). Heads run in one batched product (`parallel_heads=True`) or one
after another (`False`); the two schedules give the same numbers.

Cached decoding is exact: the only state a block needs is the history of its mixer inputs p (after the input
projection), kept in a preallocated buffer `(B, H, S, D)` per layer; a new token at position t costs one dot
product over the t + 1 stored inputs per channel, O(E·t) per layer, plus the O(E² + E·F) of the projections.
Two decode steps compute the same numbers (`config.decode_step`): the dynamic step reads the filled slots
`[:t + 1]` (fastest eagerly, but its shapes change with t); the shape-static step writes slot t with `index_copy_`
at the tensor `cache.cache_position`, reads the whole buffer with the kernel gathered by position (exactly 0 after
t) and takes positions from tensors, so `torch.compile(fullgraph=True)` / CUDA graphs capture one graph for every
step. `generate(..., compile_config=CompileConfig(...))` uses it (see `ToeplitzMixerForCausalLM`).

`decode_mode="recurrent"` trades exactness for a constant-size state: each head's kernel is distilled into its first
W taps plus N complex modes, and a decode step costs O(E·(W + N)) per layer (see `recurrent_toeplitz_mixer.py`).

Left padding is exact: padded positions of p are zeroed in every layer and c, β are indexed with per-row positions
(`position_ids`, from the attention mask); the convolution is shift-invariant, so a padded row equals the row alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ..modeling_zoo_common import (
    ZooDropout,
    ZooPreTrainedModel,
    ZooStateCacheGenerationMixin,
    few_rows_linear,
    fft_causal_conv,
    toeplitz_matrix,
)
from .cache_toeplitz_mixer import ToeplitzMixerCache
from .configuration_toeplitz_mixer import ToeplitzMixerConfig
from .recurrent_toeplitz_mixer import ModalFit, ToeplitzRecurrentCache, fit_modal_kernel, modal_tables


class ToeplitzMixer(nn.Module):
    """Multi-head causal Toeplitz token mixer (see the module docstring for the math).

    Parameters: `kernel_weight` `(H, S)` (raw kernels w; `kernel()` gives k), `position_bias` `(H, S)` (β), and
    with `do_toep_proj` the projections `inp_proj` (E → E, bias) and `out_proj` (E → E, no bias).
    """

    def __init__(self, config: ToeplitzMixerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.kernel_weight = nn.Parameter(torch.empty(config.num_heads, config.max_position_embeddings))
        self.position_bias = nn.Parameter(torch.zeros(config.num_heads, config.max_position_embeddings))
        if config.do_toep_proj:
            self.inp_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
            self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self._modal_fit: tuple[tuple[Any, ...], ModalFit] | None = None  # (what it was fitted for, the fit)

    def kernel(self) -> torch.Tensor:
        """The effective kernels k `(H, S)`: `softplus(w)` or `w` (`config.kernel_param`)."""
        return F.softplus(self.kernel_weight) if self.config.kernel_param == "softplus" else self.kernel_weight

    def normaliser(self, kernel: torch.Tensor) -> torch.Tensor:
        """`c[h, t] = Σ_{m ≤ t} k[h, m]` `(H, S)`, with `|c|` floored at `toep_norm_eps` when that is positive."""
        total = kernel.cumsum(-1)
        eps = self.config.toep_norm_eps
        if eps > 0:
            total = torch.where(total >= 0, total.clamp(min=eps), total.clamp(max=-eps))
        return total

    def modal_fit(self) -> ModalFit:
        """The kernels' modal fit for `decode_mode="recurrent"` (see `recurrent_toeplitz_mixer.py`), computed once
        per weight version (an optimiser step or `load_state_dict` changes it; an in-place write through `.data`
        bypasses autograd's version counter and is not seen), state size and window."""
        key = (self.kernel_weight._version, self.kernel_weight.data_ptr(), self.config.recurrent_state_size,
               self.config.recurrent_window)
        if self._modal_fit is None or self._modal_fit[0] != key:
            with torch.no_grad():
                fit = fit_modal_kernel(self.kernel(), self.config.recurrent_state_size, self.config.recurrent_window)
            self._modal_fit = (key, fit)
        return self._modal_fit[1]

    def _mix_sequence(self, kernel: torch.Tensor, p: torch.Tensor, parallel: bool) -> torch.Tensor:
        """Causal convolution of a whole sequence starting at position 0: `(B, T, H, D)` → `(B, T, H, D)`."""
        batch, length, heads, dim = p.shape
        impl = self.config.mixer_impl
        if impl == "fft" or (impl == "auto" and length >= self.config.fft_min_length):
            if parallel:
                return fft_causal_conv(p, kernel)
            return torch.stack([fft_causal_conv(p[:, :, h], kernel[h]) for h in range(heads)], dim=2)
        matrix = toeplitz_matrix(kernel, 0, length, length).to(p.dtype)  # (H, T, T)
        if parallel:
            # heads as the bmm batch, (batch, channel) as columns: no (B·H, T, T) copy of the matrix
            columns = p.permute(2, 1, 0, 3).reshape(heads, length, batch * dim)
            return torch.bmm(matrix, columns).view(heads, length, batch, dim).permute(2, 1, 0, 3)
        outputs = []
        for h in range(heads):
            columns = p[:, :, h].transpose(0, 1).reshape(length, batch * dim)
            outputs.append((matrix[h] @ columns).view(length, batch, dim).transpose(0, 1))
        return torch.stack(outputs, dim=2)

    def _tables(self, cache: ToeplitzMixerCache | None) -> dict[str, torch.Tensor]:
        """The kernel-derived tensors of this layer: `kernel` k `(H, S)`, `normaliser_t` c transposed `(S, H)` (with
        `do_toep_mean`), `bias_t` β transposed `(S, H)` and, when decoding, `flipped` (k reversed along S).

        During eager inference with a cache they are computed once per cache (at its first call) and reused by every
        decode step, which saves the softplus, cumsum and flip of each step; a cache already belongs to the weights
        that filled it (its history is their output). With gradients enabled, without a cache, or while compiling
        they are computed afresh (the compiler fuses them into the step)."""
        memoise = cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if memoise and self.layer_idx in cache.layer_tables:
            return cache.layer_tables[self.layer_idx]
        kernel = self.kernel()
        tables = {"kernel": kernel, "bias_t": self.position_bias.t()}
        if self.config.do_toep_mean:
            tables["normaliser_t"] = self.normaliser(kernel).t()
        if isinstance(cache, ToeplitzRecurrentCache):
            if torch.compiler.is_compiling():  # fitted eagerly by the prefill (the fit itself is not traceable)
                if self._modal_fit is None:
                    raise ValueError("recurrent decoding compiles only after an eager prefill has fitted the modes")
                fit = self._modal_fit[1]
            else:
                fit = self.modal_fit()
            tables.update(modal_tables(fit, kernel.dtype))
        if memoise:
            tables["flipped"] = kernel.flip(-1)
            cache.layer_tables[self.layer_idx] = tables
        return tables

    def _weighted_sum(self, history: torch.Tensor, weights: torch.Tensor, parallel: bool) -> torch.Tensor:
        """`y[b, h, d] = Σ_s weights[h, s] · history[b, h, s, d]` for one new token: `(B, 1, H, D)`. A product and a
        sum (measured faster on a CPU than a batched GEMV, eagerly and compiled, where it fuses into one loop
        vectorised over the channels)."""
        if parallel:
            y = (history * weights[None, :, :, None]).sum(2)  # (B, H, D)
        else:
            y = torch.stack([(history[:, h] * weights[h, :, None]).sum(1) for h in range(self.num_heads)], dim=1)
        return y[:, None]

    def _mix_history(
        self, kernel: torch.Tensor, history: torch.Tensor, num_new: int, parallel: bool,
        flipped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Outputs of the last `num_new` positions against the stored inputs `history` `(B, H, t, D)`:
        `(B, num_new, H, D)`. One decode step reads the t stored inputs once: O(E·t). `flipped` is `kernel`
        reversed (optional; its last t entries are the step's weights, a view)."""
        filled = history.shape[2]
        if num_new == 1:  # a decode step: a weighted sum over the history
            # weights[h, s] = k[h, t - s]
            weights = flipped[:, flipped.shape[1] - filled:] if flipped is not None else kernel[:, :filled].flip(-1)
            weights = weights.to(history.dtype)
            return self._weighted_sum(history, weights, parallel)
        rows = toeplitz_matrix(kernel, filled - num_new, num_new, filled).to(history.dtype)  # (H, num_new, t)
        if parallel:
            y = torch.matmul(rows, history)  # (B, H, num_new, D)
        else:
            y = torch.stack([rows[h] @ history[:, h] for h in range(self.num_heads)], dim=1)
        return y.transpose(1, 2)

    def _mix_static_step(
        self, kernel: torch.Tensor, history: torch.Tensor, slot: torch.Tensor, slots: torch.Tensor, parallel: bool
    ) -> torch.Tensor:
        """Output of one new token in slot `slot` (a `(1,)` tensor) against the whole history buffer `(B, H, S, D)`:
        `(B, 1, H, D)`. The weights are gathered by position, `weights[h, s] = k[h, t − s]` for `s ≤ t` and exactly
        0 after t, so no shape depends on t (`slots` is `arange(S)`)."""
        lag = slot - slots  # (S,): t - s
        weights = torch.where(lag >= 0, kernel.index_select(1, lag.clamp(min=0)), 0.0).to(history.dtype)  # (H, S)
        return self._weighted_sum(history, weights, parallel)

    def _mix_recurrent(self, tables: dict[str, torch.Tensor], p: torch.Tensor, cache: ToeplitzRecurrentCache,
                       parallel: bool, static_step: bool) -> torch.Tensor:
        """`decode_mode="recurrent"`: a prompt into an empty cache is mixed exactly and sets the state; new tokens
        after it go through the recurrence one at a time (`(B, T, H, D)` → `(B, T, H, D)`)."""
        if not static_step and cache.seen_tokens == 0:
            cache.fill(self.layer_idx, p, tables)
            return self._mix_sequence(tables["kernel"], p, parallel)
        steps = [cache.step(self.layer_idx, p[:, i:i + 1], tables, cache.cache_position + i)
                 for i in range(p.shape[1])]
        return steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: ToeplitzMixerCache | None = None,
        parallel: bool = True,
        static_step: bool = False,
    ) -> torch.Tensor:
        """Mix `hidden_states` `(B, T, E)` (already normalised) along the sequence.

        Args:
            positions: `(B or 1, T)` position of each token in its row (indexes c and β).
            token_mask: `(B, T)`, 0 at padded tokens, whose mixer inputs are zeroed.
            cache: the decoding state; the inputs are appended to this layer's history and mixed against it.
            parallel: head schedule (batched over heads, or a loop over heads).
            static_step: one new token written and read at the tensor position `cache.cache_position` (the
                shape-static step, see `ToeplitzMixerConfig.decode_step`); needs `cache` and T = 1.
        """
        batch, length, _ = hidden_states.shape
        p = self.inp_proj(hidden_states) if self.config.do_toep_proj else hidden_states
        if token_mask is not None:
            p = p * token_mask[..., None].to(p.dtype)
        p = p.view(batch, length, self.num_heads, self.head_dim)
        tables = self._tables(cache)
        kernel = tables["kernel"]
        if isinstance(cache, ToeplitzRecurrentCache):
            y = self._mix_recurrent(tables, p, cache, parallel, static_step)
        elif static_step:
            history = cache.write_history_static(self.layer_idx, p)
            y = self._mix_static_step(kernel, history, cache.cache_position, cache.slots, parallel)
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if cache is not None:
                history = cache.write_history(self.layer_idx, p)
            if past == 0:
                y = self._mix_sequence(kernel, p, parallel)
            else:
                y = self._mix_history(kernel, history, length, parallel, flipped=tables.get("flipped"))
        if self.config.do_toep_mean:
            y = y / tables["normaliser_t"][positions][..., None]  # c[h, position], (B, T, H, 1)
        y = y + tables["bias_t"][positions][..., None]
        y = y.reshape(batch, length, -1)
        return self.out_proj(y) if self.config.do_toep_proj else y


class ToeplitzMixerMLP(nn.Module):
    """`fc2(Dropout(act(fc1(x))))`, E → F → E, with biases."""

    def __init__(self, config: ToeplitzMixerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = ZooDropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(hidden_states))))


class ToeplitzMixerBlock(GradientCheckpointingLayer):
    """`x + Mixer(RMSNorm(x))`, then `+ MLP(RMSNorm(x))`."""

    def __init__(self, config: ToeplitzMixerConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = ToeplitzMixer(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ToeplitzMixerMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: ToeplitzMixerCache | None = None,
        parallel: bool = True,
        static_step: bool = False,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), positions, token_mask,
                                                   cache=cache, parallel=parallel, static_step=static_step)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class ToeplitzMixerPreTrainedModel(ZooPreTrainedModel):
    config_class = ToeplitzMixerConfig
    config: ToeplitzMixerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ToeplitzMixerBlock"]
    _can_record_outputs = {"hidden_states": ToeplitzMixerBlock}

    def _init_weights(self, module: nn.Module) -> None:
        # The seed's initialisation: every Linear / Embedding weight and the raw kernels ~ N(0, 0.2²) by default.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ToeplitzMixer):
            init.normal_(module.kernel_weight, mean=0.0, std=self.config.toeplitz_init_std)
            init.zeros_(module.position_bias)


class ToeplitzMixerModel(ToeplitzMixerPreTrainedModel):
    """The embedding and the stack of (mixer, MLP) blocks with the final RMSNorm; no LM head."""

    def __init__(self, config: ToeplitzMixerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ToeplitzMixerBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def check_context(self, total: int) -> None:
        """Raise under `context_overflow="error"` when a sequence of `total` tokens exceeds the kernels' length.

        Raises:
            ValueError: naming `max_position_embeddings`.
        """
        limit = self.config.max_position_embeddings
        if total > limit and self.config.context_overflow == "error":
            raise ValueError(
                f"the sequence reaches {total} tokens but the Toeplitz kernels cover max_position_embeddings="
                f"{limit} positions (the model's hard context); shorten the input or max_new_tokens, or set "
                f"context_overflow='sliding_recompute' to read only the last {limit} tokens"
            )

    def _overflow_window(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: ToeplitzMixerCache | None,
        total: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply `context_overflow` to a call that would reach `total > max_position_embeddings` tokens: raise, or
        return the window of the last S token ids (and its mask) to recompute from position 0."""
        limit = self.config.max_position_embeddings
        self.check_context(total)
        if input_ids is None:
            raise ValueError("context_overflow='sliding_recompute' needs `input_ids`, not `inputs_embeds`")
        if attention_mask is not None and attention_mask.shape[1] < total:
            raise ValueError(f"context_overflow='sliding_recompute' needs the whole `attention_mask` ({total} "
                             f"columns: cached plus new tokens) to re-read the window, got {attention_mask.shape[1]}")
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = torch.cat([cache.cached_token_ids(), input_ids], dim=1)
            cache.reset()
        window_mask = attention_mask[:, -limit:] if attention_mask is not None else None
        return input_ids[:, -limit:], window_mask

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> ToeplitzMixerCache:
        """An empty decoding cache of `config.decode_mode`: [`ToeplitzMixerCache`] (exact) or
        [`ToeplitzRecurrentCache`] (recurrent)."""
        cache_class = ToeplitzRecurrentCache if self.config.decode_mode == "recurrent" else ToeplitzMixerCache
        return cache_class(self.config, batch_size, device=device, dtype=dtype)

    def recurrent_fit(self) -> list[ModalFit]:
        """Each layer's modal fit for `decode_mode="recurrent"` (fitted now if the weights changed since)."""
        return [layer.mixer.modal_fit() for layer in self.layers]

    def _static_decode(self) -> bool:
        """Whether a one-token cached step takes the shape-static path (`config.decode_step`)."""
        mode = self.config.decode_step
        return mode == "static" or (mode == "auto" and torch.compiler.is_compiling())

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        parallel_heads: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids (after the cached ones, if any).
            attention_mask (`torch.Tensor` of shape `(batch, past + seq)` or `(batch, seq)`, *optional*): 1 for
                real tokens, 0 for (left) padding; padded tokens are excluded from the mixing exactly.
            position_ids (`torch.LongTensor` of shape `(batch or 1, seq)`, *optional*): position of each token in
                its row (default: the number of real tokens before it, continuing the cache's per-row count; only
                the last `seq` columns of `attention_mask` are read).
            cache ([`ToeplitzMixerCache`], *optional*): the decoding state of the previous tokens.
            inputs_embeds (`torch.Tensor` of shape `(batch, seq, hidden)`, *optional*): instead of `input_ids`.
            use_cache (`bool`, *optional*): create (if missing) and return the cache (default: `config.use_cache` in
                eval mode, off in training mode, where a preallocated history would only cost time).
            parallel_heads (`bool`, *optional*): head schedule of this call (default `config.parallel_heads`).
            output_hidden_states (`bool`, *optional*): also return the embeddings and every block's output, the
                last one normalised (keyword or config field, as in Llama).

        Raises:
            ValueError: the cached plus new tokens exceed `max_position_embeddings` under
                `context_overflow="error"`, or the inputs are inconsistent.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be a 2-D padding mask (batch, seq), got {attention_mask.dim()}-D")
        if use_cache is None:  # the config's default builds a decoding cache in eval mode only, never in training
            use_cache = self.config.use_cache and not self.training
        parallel = self.config.parallel_heads if parallel_heads is None else parallel_heads
        if cache is not None and not isinstance(cache, ToeplitzMixerCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"a {type(cache).__name__} with content cannot continue a Toeplitz mixer")
            cache = None
        if not use_cache:
            cache = None

        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        # the shape-static step: one token into a given cache, indexed by the tensor `cache.cache_position`
        static_step = cache is not None and length == 1 and self._static_decode()
        # A compiled static step never reads the Python count `seen_tokens` (a per-step value: reading it would
        # specialise or symbolise the graph on it); the context limit is then checked eagerly by `generate`
        # (`prepare_inputs_for_generation`) and, in any case, by the out-of-range write.
        count_in_python = not (static_step and torch.compiler.is_compiling()
                               and self.config.context_overflow == "error")
        num_outputs = length
        if count_in_python:
            past = cache.get_seq_length() if cache is not None else 0
            if past + length > self.config.max_position_embeddings:
                input_ids, attention_mask = self._overflow_window(input_ids, attention_mask, cache, past + length)
                num_outputs = min(length, input_ids.shape[1])
                length, position_ids, static_step = input_ids.shape[1], None, False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = self.new_cache(batch, device=inputs_embeds.device, dtype=inputs_embeds.dtype)

        token_mask = attention_mask[:, -length:] if attention_mask is not None else None
        if position_ids is None:  # positions count real tokens: the cache knows each row's count so far
            if cache is not None:
                position_ids = cache.next_positions(token_mask, length)
            elif token_mask is not None:
                position_ids = (token_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(length, device=inputs_embeds.device)[None]

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_ids, token_mask, cache=cache, parallel=parallel,
                                  static_step=static_step)
        if cache is not None:
            cache.advance(input_ids, length, token_mask, static=static_step, count_in_python=count_in_python)
        hidden_states = self.norm(hidden_states[:, -num_outputs:])
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ToeplitzMixerForCausalLM(ToeplitzMixerPreTrainedModel, ZooStateCacheGenerationMixin, GenerationMixin):
    """The Toeplitz mixer with its (untied by default) LM head; `labels` give the shifted cross-entropy loss.

    Compiled decoding: `generate(..., compile_config=CompileConfig(fullgraph=True, dynamic=False))` (or
    `cache_implementation="static"`) creates the cache before the prefill, so `generate` runs the decode steps
    through `torch.compile` (with `"static"` alone: on CUDA, as for transformers' `StaticCache`), where the default
    `decode_step="auto"` takes the shape-static step (one graph per batch size; on CUDA the library's default
    `mode="reduce-overhead"` adds CUDA graphs). On a CPU the library compiles only when told to, with
    `compile_config._compile_all_devices = True`. A compiled step of your own works the same way:
    `torch.compile(model, fullgraph=True)` called with one token, a `(batch, 1)` mask and a cache.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ToeplitzMixerConfig) -> None:
        super().__init__(config)
        self.model = ToeplitzMixerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The library's inputs, after checking the context limit eagerly (a compiled static decode step does not
        read the Python token count, so `generate` checks it here, before each step). The mixer reads the 2-D
        padding mask, and once the cache holds tokens only its last `seq` columns (the cache counts each row's real
        tokens), so a decode step gets a `(batch, 1)` mask whose shape does not grow: a compiled step sees static
        shapes. The whole mask is kept when this call may cross the context under `"sliding_recompute"`, which
        re-reads the window's padding."""
        if isinstance(cache, ToeplitzMixerCache) and next_sequence_length is not None:
            self.model.check_context(cache.get_seq_length() + next_sequence_length)
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                       cache=cache, **kwargs)
        mask, new_ids = inputs.get("attention_mask"), inputs.get("input_ids")
        if isinstance(cache, ToeplitzMixerCache) and mask is not None and new_ids is not None:
            past, length = cache.get_seq_length(), new_ids.shape[1]
            if past > 0 and past + length <= self.config.max_position_embeddings:
                inputs["attention_mask"] = mask[:, -length:]
        return inputs

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict[str, Any], generation_mode: Any, batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Under `context_overflow="error"` a call whose longest input (`max_cache_length`: prompt +
        max_new_tokens - 1 tokens) exceeds `max_position_embeddings` fails here, before the prefill, cached or
        not; then the cache is prepared (see `_state_cache_for_generation`)."""
        self.model.check_context(max_cache_length)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)

    def _state_cache_for_generation(self, generation_config: Any, batch_size: int) -> ToeplitzMixerCache | None:
        """With a `compile_config` or `cache_implementation="static"`, the [`ToeplitzMixerCache`] is created before
        the prefill, so `generate` sees a compileable cache and (with a `compile_config`, or on CUDA by itself, as
        for transformers' `StaticCache`) runs the decode steps through `torch.compile` (the shape-static step, see
        `decode_step`); otherwise the model creates it on the first forward pass (eager decoding)."""
        if generation_config.compile_config is None and generation_config.cache_implementation != "static":
            return None
        return self.model.new_cache(batch_size, device=self.device, dtype=self.dtype)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        parallel_heads: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): targets, unshifted (the model shifts
                them); `-100` is ignored. Under `context_overflow="sliding_recompute"` with more than
                `max_position_embeddings` tokens, only the last window's labels are used.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): logits for the last `n` positions only (0: all).
            parallel_heads (`bool`, *optional*): head schedule of this call (default `config.parallel_heads`);
                `generate(..., parallel_heads=False)` passes it to every step.

        Other arguments as in [`ToeplitzMixerModel.forward`]. Returns logits `(batch, seq, vocab)`.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            parallel_heads=parallel_heads,
            return_dict=True,
            **kwargs,
        )
        logits = few_rows_linear(self.lm_head, slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if labels is not None:
            labels = labels[:, -outputs.last_hidden_state.shape[1]:]
        loss = self.causal_lm_loss(logits, labels, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)


__all__ = [
    "ToeplitzMixerCache",
    "ToeplitzMixerForCausalLM",
    "ToeplitzMixerModel",
    "ToeplitzMixerPreTrainedModel",
    "fft_causal_conv",
    "toeplitz_matrix",
]
