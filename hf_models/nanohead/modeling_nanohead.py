"""Nanohead GPT (seed 003): a nanochat-style GPT whose attention mixes normal heads with tiny "nanoheads".

The whole model, per token position t and layer l (x is the residual stream, width `hidden_size`):

    x = rmsnorm(embed(token))                                  # parameter-free RMSNorm after the embedding
    for each block:
        h = rmsnorm(x)
        normal heads i (dim d, even):   q_i, k_i, v_i = W_q h, W_k h, W_v h          (GQA: k, v shared by g heads)
                                        q_i, k_i = rmsnorm(rope(q_i, t)), rmsnorm(rope(k_i, t))
        nanoheads j (dim d_n, 2-5):     q_j, k_j, v_j = U_q h, U_k h, U_v h          (same GQA ratio g)
                                        q_j, k_j = rmsnorm(q_j), rmsnorm(k_j)          (no rotary positions)
        (W_q, W_k, U_q, U_k, W_v, U_v are the row blocks of one matrix `qkv_proj`, in that order)
        each head: o = causal_softmax(q · k^T / sqrt(dim)) v
        x = x + W_o [o_normal ; o_nano]                         # one output projection over both kinds
        x = x + W_down relu(W_up rmsnorm(x))^2
    logits = c * tanh(W_lm rmsnorm(x) / c)                      # logit soft-capping (c = final_logit_softcapping)

`nanohead_proportion` sets the share of the query/key/value parameters (equivalently of the concatenated output
width) given to nanoheads; `calculate_nanohead_split` rounds it to head counts that fill `hidden_size` exactly.
At proportion 0 there are no nanoheads and the model is the plain GPT.

Key/value cache: transformers' layout `(batch, cache_kv_heads, seq, d)`, one cache layer per decoder layer of
`DynamicCache` or `StaticCache` (or any other), holding both kinds of heads of the same token. Slots `[0, kv_heads)`
are the normal KV heads, exactly Llama's (at proportion 0 that is all there is: `(batch, num_key_value_heads, seq,
head_dim)`); the nanohead keys (and values), concatenated channel after channel (`nano_kv_heads * d_n` channels), are
packed into the `p = ceil(nano_kv_heads * d_n / d)` slots after them, the last one zero-padded, so
`cache_kv_heads = kv_heads + p` (`cache_head_shape`). A slot of that tail is a width-d slab of nano channels, not
one head. Memory per token and layer: `2 (kv_heads + p) d` elements against `2 (kv_heads d + nano_kv_heads d_n)` for
a flat layout, i.e. at most `d - 1` padded channels per key and per value (see the model card for measured sizes).
Nanohead keys carry no rotary phase, so they need no position handling.

Attention weights (`output_attentions=True`, keyword or config): both kinds of heads run on eager attention, and
each layer returns `(batch, num_heads + num_nanoheads, q_len, kv_len)`: the normal heads first, then the nanoheads,
in the order their outputs enter `o_proj`.

Attention backends: each kind of head runs on the configured implementation if its kernel accepts the head
dimension, else on a fallback (`attention_backend`): flash kernels need a head dimension that is a multiple of 8
(at most 256), flex attention at least 16; SDPA (whose math kernel accepts any dimension) is the fallback, eager
attention the last resort.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..fused_cross_entropy import linear_cross_entropy, softcapped_logits_and_loss
from ..modeling_zoo_common import ZooPreTrainedModel, ZooRotaryEmbedding, apply_rotary, few_rows_linear, \
    uses_chunked_loss
from .configuration_nanohead import NanoheadConfig, NanoheadSplit

# Which head dimensions each attention implementation's kernel accepts. Implementations not listed accept any
# dimension. Kernel-hub implementations ("kernels-community/flash-attn", ...) match by substring.
HEAD_DIM_SUPPORT: dict[str, Callable[[int], bool]] = {
    "flash_attention": lambda dim: dim % 8 == 0 and dim <= 256,
    "flash-attn": lambda dim: dim % 8 == 0 and dim <= 256,
    "flex_attention": lambda dim: dim >= 16,
}
FALLBACK_BACKENDS = ("sdpa", "eager")
# SDPA's fused CUDA kernels need a head dimension that is a multiple of 8 (flash; memory-efficient in half
# precision); below that it silently runs its math kernel, which materialises every (q_len, kv_len) score matrix.
# Heads of such a dimension are zero-padded to the multiple on these devices: padded query/key channels add 0 to
# every dot product and padded value channels are sliced off, so the result is unchanged (the scale stays d^-0.5).
SDPA_PAD_MULTIPLE: dict[str, int] = {"cuda": 8}


def _accepts(implementation: str, head_dim: int) -> bool:
    return all(accepts(head_dim) for name, accepts in HEAD_DIM_SUPPORT.items() if name in implementation)


def attention_backend(implementation: str | None, head_dim: int) -> str:
    """The attention implementation that a kind of head of dimension `head_dim` runs on.

    `implementation` (the config's `_attn_implementation`) if its kernel accepts `head_dim`, else the first of
    `FALLBACK_BACKENDS` that does (`sdpa`, then `eager`, which accepts every dimension).
    """
    implementation = implementation or "eager"
    if _accepts(implementation, head_dim):
        return implementation
    return next((name for name in FALLBACK_BACKENDS if _accepts(name, head_dim)), "eager")


def padded_head_dim(backend: str, device: torch.device, head_dim: int) -> int:
    """The head dimension `_attend` hands to `backend` on `device`: `head_dim`, or for SDPA on a device of
    `SDPA_PAD_MULTIPLE` the next multiple of its entry."""
    multiple = SDPA_PAD_MULTIPLE.get(device.type) if backend == "sdpa" else None
    return -(-head_dim // multiple) * multiple if multiple else head_dim


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out. `query` `(batch, heads, q_len, dim)`, `key`/`value`
    `(batch, kv_heads, kv_len, dim)`, `attention_mask` additive `(batch, 1, q_len, kv_len)`.

    Returns the output `(batch, q_len, heads, dim)` and the weights `(batch, heads, q_len, kv_len)`.
    """
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class NanoheadRMSNorm(nn.Module):
    """RMSNorm without a learnable gain (nanochat's `norm`), over the last dimension."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.eps)


def cache_head_shape(split: NanoheadSplit) -> tuple[int, int]:
    """`(cache_kv_heads, head_dim)` of a cache layer: the normal KV heads, then the nanohead channels packed into
    slots of the normal head dimension (see the module docstring)."""
    nano_slots = -(-split.num_nano_kv_heads * split.nanohead_dim // split.head_dim)
    return split.num_kv_heads + nano_slots, split.head_dim


def wants_attentions(config: NanoheadConfig, kwargs: dict[str, Any]) -> bool:
    """Whether this call returns attention weights (`output_attentions`, keyword first, else the config's)."""
    asked = kwargs.get("output_attentions")
    return bool(config.output_attentions if asked is None else asked)


class NanoheadAttention(nn.Module):
    """Causal self-attention with normal heads (rotary, QK-norm, GQA) and nanoheads (QK-norm, no rotary), whose
    outputs are concatenated and mixed by one output projection `o_proj`.

    The six query/key/value projections (three per kind of head) are the row blocks of one matrix `qkv_proj`,
    laid out `[q | k | nano_q | nano_k | v | nano_v]`, so one matmul computes them, the rotary embedding and the
    QK-norm each run once over the queries and keys of a kind, and the values of both kinds are already the
    concatenation the cache stores.
    """

    def __init__(self, config: NanoheadConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        split: NanoheadSplit = config.nanohead_split
        self.split = split
        self.num_key_value_groups = split.num_heads // split.num_kv_heads
        self.is_causal = True
        self.qkv_proj = nn.Linear(config.hidden_size, split.width + 2 * split.kv_width, bias=False)
        self.o_proj = nn.Linear(split.width, config.hidden_size, bias=False)
        self.o_proj.is_output_projection = True
        self.qk_norm = NanoheadRMSNorm(config.rms_norm_eps)
        # Per query head log logit scale (normal heads, then nanoheads), see `config.learnable_logit_scale`.
        self.log_logit_scale = (nn.Parameter(torch.zeros(split.num_heads + split.num_nanoheads))
                                if config.learnable_logit_scale else None)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_masks: dict[str, Any],
        head_dim: int,
        eager: bool,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of one kind of heads; `query` `(batch, seq, heads, dim)`, `key`/`value` `(batch, kv_heads,
        kv_len, dim)`; returns `(batch, seq, heads * dim)` and the weights `(batch, heads, seq, kv_len)` (eager
        attention, `eager=True`) or `None`."""
        backend = "eager" if eager else attention_backend(self.config._attn_implementation, head_dim)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(backend, eager_attention_forward)
        query = query.transpose(1, 2)
        width = padded_head_dim(backend, query.device, head_dim)
        if width != head_dim:
            query, key, value = (F.pad(tensor, (0, width - head_dim)) for tensor in (query, key, value))
        if backend not in attention_masks:
            raise ValueError(f"no '{backend}' attention mask was prepared: with prepared masks (a static cache in "
                             "`generate`), ask for attention weights with `config.output_attentions=True`")
        output, weights = interface(self, query, key, value, attention_masks[backend], dropout=0.0,
                                    scaling=head_dim**-0.5, **kwargs)
        return output[..., :head_dim].reshape(*output.shape[:2], -1), weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_masks: dict[str, Any],
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `(batch, seq, hidden)` → `(batch, seq, hidden)`, and the attention weights `(batch,
        num_heads + num_nanoheads, seq, kv_len)` when asked for (`output_attentions`), else `None`."""
        split = self.split
        n, n_kv, d = split.num_heads, split.num_kv_heads, split.head_dim
        m, m_kv, d_n = split.num_nanoheads, split.num_nano_kv_heads, split.nanohead_dim
        batch, seq = hidden_states.shape[:2]
        qkv = self.qkv_proj(hidden_states)
        qk_end, values_start = (n + n_kv) * d, split.width + split.kv_width
        cos, sin = position_embeddings
        qk = self.qk_norm(apply_rotary(qkv[..., :qk_end].view(batch, seq, n + n_kv, d), cos, sin, heads_dim=2))
        query, key = qk[:, :, :n], qk[:, :, n:]
        scales = self.log_logit_scale.exp()[:, None] if self.log_logit_scale is not None else None  # (heads, 1)
        if scales is not None:
            query = query * scales[:n].to(query.dtype)
        keys = key.flatten(2)  # (batch, seq, kv_width): normal keys, then nanohead keys
        values = qkv[..., values_start:]  # normal values, then nanohead values
        if m:
            nano_qk = self.qk_norm(qkv[..., qk_end:values_start].view(batch, seq, m + m_kv, d_n))
            nano_query, nano_key = nano_qk[:, :, :m], nano_qk[:, :, m:]
            if scales is not None:
                nano_query = nano_query * scales[n:].to(nano_query.dtype)
            keys = torch.cat([keys, nano_key.flatten(2)], dim=-1)
        slots = cache_head_shape(split)[0]
        padding = slots * d - split.kv_width
        # transformers' layout (batch, cache_kv_heads, seq, d): normal KV heads, then the packed nanohead channels
        keys, values = (F.pad(tensor, (0, padding)) if padding else tensor for tensor in (keys, values))
        keys, values = (tensor.reshape(batch, seq, slots, d).transpose(1, 2) for tensor in (keys, values))
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)

        eager = wants_attentions(self.config, kwargs)
        outputs, weights = self._attend(query, keys[:, :n_kv], values[:, :n_kv], attention_masks, d, eager, **kwargs)
        if m:
            nano_keys, nano_values = (
                tensor[:, n_kv:].transpose(1, 2).flatten(2)[..., : m_kv * d_n].unflatten(-1, (m_kv, d_n))
                .transpose(1, 2) for tensor in (keys, values))
            nano_outputs, nano_weights = self._attend(nano_query, nano_keys, nano_values, attention_masks, d_n,
                                                      eager, **kwargs)
            outputs = torch.cat([outputs, nano_outputs], dim=-1)
            weights = torch.cat([weights, nano_weights], dim=1) if eager else None
        return self.o_proj(outputs), weights


class NanoheadMLP(nn.Module):
    """`down(act(up(x)))`, ReLU² by default (nanochat's MLP)."""

    def __init__(self, config: NanoheadConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_output_projection = True
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class NanoheadDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: NanoheadConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = NanoheadAttention(config, layer_idx)
        self.mlp = NanoheadMLP(config)
        self.input_layernorm = NanoheadRMSNorm(config.rms_norm_eps)
        self.post_attention_layernorm = NanoheadRMSNorm(config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_masks: dict[str, Any],
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_masks, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attention
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NanoheadPreTrainedModel(ZooPreTrainedModel):
    config_class = NanoheadConfig
    config: NanoheadConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoheadDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": NanoheadDecoderLayer, "attentions": OutputRecorder(NanoheadAttention, 1)}

    def _init_weights(self, module: nn.Module) -> None:
        # Close to nanochat's scheme: unit-variance embeddings (normalised right away), input projections and the
        # LM head with std 1/sqrt(fan_in), and the blocks' output projections (`o_proj`, `down_proj`), which
        # nanochat zeroes so that every block starts as the identity, small but non-zero (std
        # `initializer_range`) so that every weight gets a gradient from the first step.
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            small = getattr(module, "is_output_projection", False)
            std = self.config.initializer_range if small else module.in_features**-0.5
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ZooRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, NanoheadAttention) and module.log_logit_scale is not None:
            init.zeros_(module.log_logit_scale)

    def _get_static_cache_init_shape(self) -> tuple[int, int]:
        """A static cache layer holds `(batch, cache_kv_heads, max_len, head_dim)` (see `cache_head_shape`)."""
        return cache_head_shape(self.config.nanohead_split)


class NanoheadModel(NanoheadPreTrainedModel):
    """The Nanohead GPT without its LM head: token ids → final normalised hidden states `(batch, seq, hidden)`."""

    def __init__(self, config: NanoheadConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embedding_norm = NanoheadRMSNorm(config.rms_norm_eps)
        self.layers = nn.ModuleList(
            [NanoheadDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = NanoheadRMSNorm(config.rms_norm_eps)
        self.split = config.nanohead_split
        self.rotary_emb = ZooRotaryEmbedding(self.split.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def attention_backends(self, eager: bool = False) -> tuple[str, str | None]:
        """The attention implementations of the normal heads and of the nanoheads (`None` without nanoheads);
        `eager` (attention weights asked for) runs both on eager attention."""
        split = self.split
        implementation = "eager" if eager else self.config._attn_implementation
        nano = attention_backend(implementation, split.nanohead_dim) if split.num_nanoheads else None
        return attention_backend(implementation, split.head_dim), nano

    def _attention_masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
        eager: bool = False,
    ) -> dict[str, Any]:
        """The causal mask in the format of each attention implementation that a kind of head runs on (`eager`:
        eager attention), keyed by implementation (a dict given as `attention_mask`, e.g. by `generate` for static
        caches, is used as is)."""
        if isinstance(attention_mask, dict):
            return attention_mask
        masks = {}
        for backend in dict.fromkeys(b for b in self.attention_backends(eager) if b is not None):
            config = self.config
            if backend != config._attn_implementation:
                config = copy.copy(config)
                config._attn_implementation = backend
            masks[backend] = create_causal_mask(
                config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids,
            )
        return masks

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids (or pass `inputs_embeds`).
            attention_mask (`torch.Tensor` of shape `(batch, past + seq)`, *optional*): 1 for real tokens, 0 for
                padding; or prepared masks keyed by attention implementation (see `create_masks_for_generate`).
            position_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): positions of the normal heads'
                rotary embedding (default: continuing after the cached tokens).
            cache (`Cache`, *optional*): key/value cache of both kinds of heads (`DynamicCache`, `StaticCache`).
            inputs_embeds (`torch.Tensor` of shape `(batch, seq, hidden)`, *optional*): embeddings instead of ids.
            use_cache (`bool`, *optional*): create (if missing) and return the cache.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens)[None]

        attention_masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids,
                                                eager=wants_attentions(self.config, kwargs))
        hidden_states = self.embedding_norm(inputs_embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_masks, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class NanoheadForCausalLM(NanoheadPreTrainedModel, GenerationMixin):
    """Nanohead GPT with its (untied by default) LM head and soft-capped logits; `labels` give the shifted
    cross-entropy loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NanoheadConfig) -> None:
        super().__init__(config)
        self.model = NanoheadModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def create_masks_for_generate(
        self,
        config: NanoheadConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The masks `generate` prepares ahead of compiled decoding with a static cache: one per attention
        implementation the two kinds of heads run on (the default would build only the configured one's)."""
        return self.model._attention_masks(inputs_embeds, attention_mask, cache, position_ids,
                                           eager=config.output_attentions)

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
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): targets for the language-model loss,
                unshifted (the model shifts them); `-100` is ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): compute logits for the last `n` positions only
                (0: all).

        Other arguments as in [`NanoheadModel.forward`]. Returns logits `(batch, seq, vocab)` in float32, or `None`
        when `config.loss_chunk_size` fuses the head into the loss (training with `labels`).
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        cap = self.config.final_logit_softcapping
        if self.training and labels is not None and self.config.loss_chunk_size is not None:
            loss = linear_cross_entropy(hidden_states, self.lm_head.weight, labels, softcap=cap,
                                        chunk_size=self.config.loss_chunk_size,
                                        num_items_in_batch=kwargs.get("num_items_in_batch"),
                                        shift_labels=kwargs.get("shift_labels"))
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache,
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        if cap is None:
            logits = few_rows_linear(self.lm_head, hidden_states).float()
            loss = self.causal_lm_loss(logits, labels, **kwargs)
        else:  # cap * tanh(W h / cap) as 2 cap * sigmoid(2 W h / cap) - cap: the same function, with torch's CPU
            # sigmoid 2-3x faster than its tanh; the scaling on the hidden states and in-place updates spare
            # vocabulary-wide temporaries (the matmul's backward does not need its output, which `.float()` passes
            # through in float32: the in-place cap of the fused path may overwrite it)
            preactivation = few_rows_linear(self.lm_head, hidden_states * (2.0 / cap)).float()
            if labels is not None and self.uses_default_causal_loss() and uses_chunked_loss(preactivation):
                logits, loss = softcapped_logits_and_loss(preactivation, cap, labels,
                                                          num_items_in_batch=kwargs.get("num_items_in_batch"),
                                                          shift_labels=kwargs.get("shift_labels"))
            else:
                logits = preactivation.sigmoid_()
                logits = logits.mul(2.0 * cap).sub_(cap) if logits.requires_grad else logits.mul_(2.0 * cap).sub_(cap)
                loss = self.causal_lm_loss(logits, labels, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["NanoheadForCausalLM", "NanoheadModel", "NanoheadPreTrainedModel"]
