"""Masked diffusion language model (seed 002): a bidirectional transformer that un-masks text, with an optional
sampler head (locally coherent "wavefront" sampling) and an optional critic head (remasking of doubtful tokens).

The trunk, per position t (x is the residual stream, width C = `hidden_size`):

    x = embed(token_t)                                   # token_t may be [MASK] (`mask_token_id`)
    for each block:
        h = rmsnorm(x);  q, k, v = W_q h, W_k h, W_v h;  q, k = rope(q, t), rope(k, t)
        x = x + W_o softmax(q k^T / sqrt(d)) v           # bidirectional: no causal mask (padding keys masked)
        x = x + W_down (silu(W_gate rmsnorm(x)) * W_up rmsnorm(x))
    h_t = rmsnorm(x);  logits_t = W_lm h_t               # W_lm tied to the embedding by default

Training (absorbing-state diffusion; the objective lives in `training/diffusion.py`): draw a masking rate
t ~ U(eps, 1) per sequence, replace each token by [MASK] with probability t, and score the model's prediction of
the original token at the masked positions. With the linear schedule the ELBO weights each masked token's
cross-entropy by 1/t (MDLM), which makes the loss an upper bound on the negative log-likelihood per token. The
model's own `forward(labels=...)` computes the plain (unshifted, unweighted) cross-entropy at every labelled
position.

Sampler head (`add_sampler_head`), an auxiliary network that never sends gradients into the trunk:

    s_t = [E(left neighbour) ; h_t ; E(right neighbour)]          (3C; every part detached)
    sampler_logits_t = W_s LN(silu(W_2 LN(silu(W_1 s_t))))       (its own vocabulary projection W_s)

where E is the (detached) token embedding and a neighbour that is missing (sequence edge, padding) or [MASK]
contributes a zero vector. Training and inference build `s_t` with the same function (`sampler_inputs`); the
original fork trained on all-zero neighbours by accident (a chained boolean-index assignment into a copy).

Critic head (`add_critic_head`): `critic_t = w_c · h_t + b_c` (on the detached h_t), the logit of "the token now at
position t is wrong".

Generation (`diffusion_generate`), from `prompt + N x [MASK]` in S steps; each step runs the trunk once:

1. the step's budget is k = ceil(masked / steps_left) positions (so the last step fills everything);
2. with `use_critic`, except at the last step, generated tokens whose critic probability of being wrong exceeds
   `critic_threshold` are re-masked first, worst first, at most `critic_remask_fraction` (rounded up) of what the
   previous step committed (ReMDM-like; the prompt is never touched); they are filled again in later steps
   (the budgets of 1. grow with them);
3. naive: sample every masked position from its own distribution (temperature, top-p) and commit the k most
   confident (probability of the sampled token under the model), keeping the rest masked (LLaDA's
   low-confidence remasking);
   wavefront: fill in waves with the sampler head: each wave samples the masked positions that have at least one
   filled neighbour (the prompt counts), conditioned on the neighbours as they are now, then updates the
   sequence; when the budget is smaller than a wave, the wave's most confident positions go first. When no
   masked position has a filled neighbour, a bootstrap first fills the `sampler_min_neighbors_ratio` share of
   the masked positions (at least one) by confidence with naive sampling.
The trunk's hidden states are not recomputed between waves of one step (that is what makes waves cheap): the
sampler sees fresh neighbours, the trunk context of the step's start. The waves live in `wavefront.py`;
left-to-right, confidence-threshold and block-wise decoding, with an approximate key/value cache of the positions
outside the active block, in `decoding.py`; the trunk accepts that cache (`cache=`, a `DynamicCache` whose keys need
not form a prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..modeling_zoo_common import IGNORE_INDEX, ZooPreTrainedModel, ZooRotaryEmbedding, apply_rotary, \
    chunked_cross_entropy, uses_chunked_loss
from .configuration_masked_diffusion import MaskedDiffusionConfig
from .sampling import DiffusionGenerateOutput, TokenSampler, ceil_div, top_k_per_row
from .wavefront import filled_neighbour, wavefront_fill  # noqa: F401  (public here too)

SAMPLERS = ("auto", "naive", "wavefront", "left_to_right", "threshold")


class MaskedDiffusionRMSNorm(nn.Module):
    """RMSNorm with a learnable gain over the last dimension."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.eps)


class MaskedDiffusionAttention(nn.Module):
    """Multi-head self-attention, bidirectional (or causal, see `attention_type`), with rotary positions."""

    def __init__(self, config: MaskedDiffusionConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.is_causal = config.attention_type == "causal"
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `(batch, seq, hidden)`; `key_mask` `(batch, 1, 1, keys)` boolean, `True` = attend, over the
        cached keys (if `cache`) then the `seq` new ones, whose keys/values (rotated) are appended to `cache`.
        Returns the output `(batch, seq, hidden)` and, with `output_attentions` (eager attention instead of SDPA),
        the weights `(batch, heads, seq, keys)`."""
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin, heads_dim=1), apply_rotary(key, cos, sin, heads_dim=1)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.is_causal:  # a cache is a prefix here: query i sees every cached key and the new keys up to i
            keys = key.shape[2]
            causal = torch.ones(seq, keys, dtype=torch.bool, device=hidden_states.device).tril(keys - seq)
            key_mask = causal if key_mask is None else key_mask & causal
        weights = None
        if output_attentions:
            scores = query @ key.transpose(-1, -2) * self.head_dim ** -0.5
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
            weights = scores.float().softmax(dim=-1).to(query.dtype)
            output = weights @ value
        else:
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq, -1)), weights


class MaskedDiffusionMLP(nn.Module):
    """SwiGLU MLP: `W_down (silu(W_gate x) * W_up x)`."""

    def __init__(self, config: MaskedDiffusionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MaskedDiffusionBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: MaskedDiffusionConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = MaskedDiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MaskedDiffusionAttention(config, layer_idx)
        self.post_attention_layernorm = MaskedDiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MaskedDiffusionMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        attention, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, key_mask, cache,
                                      output_attentions)
        hidden_states = hidden_states + attention
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MaskedDiffusionSamplerHead(nn.Module):
    """The sampler head: `[E(left) ; h ; E(right)]` `(…, 3C)` → Linear → SiLU → LayerNorm → Linear → SiLU
    → LayerNorm → its own vocabulary projection `(…, vocab)`. Inputs come from `sampler_inputs` (detached)."""

    def __init__(self, config: MaskedDiffusionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc1 = nn.Linear(3 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)

    def forward(self, sampler_inputs: torch.Tensor) -> torch.Tensor:
        features = self.norm1(F.silu(self.fc1(sampler_inputs)))
        features = self.norm2(F.silu(self.fc2(features)))
        return self.lm_head(features)


@dataclass
class MaskedDiffusionLMOutput(MaskedLMOutput):
    """[`MaskedLMOutput`] plus the trunk's final (normalised) hidden states, which the sampler and critic heads read.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(batch, seq, hidden)`): `h_t` of every position.
    """

    last_hidden_state: torch.Tensor | None = None


class MaskedDiffusionPreTrainedModel(ZooPreTrainedModel):
    config_class = MaskedDiffusionConfig
    config: MaskedDiffusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MaskedDiffusionBlock"]
    _can_record_outputs = {"hidden_states": MaskedDiffusionBlock,
                           "attentions": OutputRecorder(MaskedDiffusionAttention, index=1)}

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (MaskedDiffusionRMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ZooRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class MaskedDiffusionModel(MaskedDiffusionPreTrainedModel):
    """The trunk without heads: token ids (with [MASK]s) → final normalised hidden states `(batch, seq, hidden)`."""

    def __init__(self, config: MaskedDiffusionConfig) -> None:
        super().__init__(config)
        if config.mask_token_id is None:
            raise ValueError("MaskedDiffusionConfig.mask_token_id is required to build a model: set it to the "
                             "tokenizer's mask token id (e.g. `mask_token_id=tokenizer.mask_token_id`).")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MaskedDiffusionBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MaskedDiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = ZooRotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids, [MASK] where a token is to be
                predicted (or pass `inputs_embeds`).
            attention_mask (`torch.Tensor` of shape `(batch, cached + seq)`, *optional*): 1 for real tokens, 0 for
                padding (padding keys are not attended to); with `cache`, the cached keys' entries come first.
            position_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): rotary positions (default
                `cached .. cached + seq - 1`).
            inputs_embeds (`torch.Tensor` of shape `(batch, seq, hidden)`, *optional*): embeddings instead of ids.
            output_hidden_states (`bool`, *optional*): also return the input of every block and the final states
                (keyword or config field).
            output_attentions (`bool`, *optional*): also return each layer's attention weights `(batch, heads,
                seq, keys)`, computed by eager attention instead of SDPA (keyword or config field).
            cache (`Cache`, *optional*): keys/values (rotated) of other positions, attended to besides the `seq` new
                ones, whose keys/values are appended to it in place. Attention is bidirectional: the cached keys need
                not be a prefix, and they are not updated by the new tokens (`decoding.py` uses this as an
                approximate cache).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            cached = 0 if cache is None else cache.get_seq_length()
            position_ids = torch.arange(cached, cached + hidden_states.shape[1], device=hidden_states.device)[None]
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        output_attentions = kwargs.get("output_attentions")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, key_mask, cache=cache,
                                  output_attentions=bool(output_attentions))
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class MaskedDiffusionForMaskedLM(MaskedDiffusionPreTrainedModel):
    """The masked diffusion LM: trunk, LM head (tied to the embedding by default) and the optional sampler and
    critic heads; `diffusion_generate` samples text. `labels` give the plain cross-entropy at labelled positions
    (not shifted); the diffusion objective is `training.diffusion.DiffusionTrainer`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _vocabulary_heads = ("sampler_head.lm_head",)

    def __init__(self, config: MaskedDiffusionConfig) -> None:
        super().__init__(config)
        self.model = MaskedDiffusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sampler_head = MaskedDiffusionSamplerHead(config) if config.add_sampler_head else None
        self.critic_head = nn.Linear(config.hidden_size, 1) if config.add_critic_head else None
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> MaskedDiffusionLMOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): the token each position should hold
                (not shifted); `-100` is ignored. The loss is their mean cross-entropy.

        Other arguments as in [`MaskedDiffusionModel.forward`]. Returns logits `(batch, seq, vocab)` in float32 and
        `last_hidden_state` `(batch, seq, hidden)`.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, cache=cache, return_dict=True, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            targets = labels.reshape(-1).to(logits.device)
            if uses_chunked_loss(logits):  # the same mean, without vocabulary-wide temporaries
                loss = chunked_cross_entropy(logits, targets, (targets != IGNORE_INDEX).sum())
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX)
        return MaskedDiffusionLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       attentions=outputs.attentions, last_hidden_state=outputs.last_hidden_state)

    # --- auxiliary heads ---------------------------------------------------------------------------------------

    def sampler_inputs(
        self, input_ids: torch.LongTensor, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[E(left neighbour) ; h_t ; E(right neighbour)]` `(batch, seq, 3 * hidden)`, every part detached.

        A neighbour at the sequence edge, a padding neighbour (`attention_mask` 0) or a [MASK] neighbour gives a
        zero vector. The same function feeds the sampler in training and in generation.
        """
        embeddings = F.embedding(input_ids, self.model.embed_tokens.weight.detach())
        present = input_ids != self.config.mask_token_id
        if attention_mask is not None:
            present = present & attention_mask.bool()
        embeddings = embeddings * present[..., None].to(embeddings.dtype)
        edge = embeddings.new_zeros(embeddings.shape[0], 1, embeddings.shape[2])
        left = torch.cat((edge, embeddings[:, :-1]), dim=1)
        right = torch.cat((embeddings[:, 1:], edge), dim=1)
        return torch.cat((left, hidden_states.detach().to(embeddings.dtype), right), dim=-1)

    def sampler_logits(self, sampler_inputs: torch.Tensor) -> torch.Tensor:
        """The sampler head's vocabulary logits (float32) for inputs `(…, 3 * hidden)` from `sampler_inputs`.

        Raises:
            ValueError: the model has no sampler head.
        """
        if self.sampler_head is None:
            raise ValueError("this model has no sampler head (config.add_sampler_head=False): use sampler='naive' "
                             "or train a model with add_sampler_head=True")
        return self.sampler_head(sampler_inputs).float()

    def critic_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The critic's logit of "the token at this position is wrong", `(batch, seq)` (float32), on detached
        hidden states.

        Raises:
            ValueError: the model has no critic head.
        """
        if self.critic_head is None:
            raise ValueError("this model has no critic head (config.add_critic_head=False): use use_critic=False "
                             "or train a model with add_critic_head=True")
        return self.critic_head(hidden_states.detach()).squeeze(-1).float()

    # --- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.LongTensor,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        steps: int | None = None,
        sampler: str = "auto",
        use_critic: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        critic_threshold: float = 0.5,
        critic_remask_fraction: float = 0.5,
        threshold: float | None = None,
        block_size: int | None = None,
        use_prefix_cache: bool = False,
        cache_refresh_every: int | None = None,
        output_history: bool = False,
        return_dict_in_generate: bool = False,
    ) -> torch.LongTensor | DiffusionGenerateOutput:
        """Generate `max_new_tokens` tokens after each prompt by iterative un-masking in `steps` steps (the
        algorithm is in the module docstring; the name and main arguments follow Dream's `diffusion_generate`).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt)`): prompts (left-padded in a batch); may be
                empty (`prompt` = 0).
            attention_mask (`torch.Tensor` of shape `(batch, prompt)`, *optional*): 1 for prompt tokens, 0 for
                padding (padding is never attended to, never a neighbour, never changed).
            max_new_tokens (`int`): tokens to generate per row.
            steps (`int`, *optional*): un-masking steps (trunk passes), in `[1, max_new_tokens]`; default
                `max_new_tokens` (one token per step).
            sampler (`str`): `"naive"` (independent parallel sampling), `"wavefront"` (sampler head), `"auto"`
                (wavefront when the model has a sampler head, else naive), `"left_to_right"` (the leftmost masks
                first, main head) or `"threshold"` (every mask whose confidence reaches `threshold`, at least one
                per step; the number of steps follows, `steps` must be left unset); see `decoding.py`.
            use_critic (`bool`): re-mask generated tokens the critic head doubts (needs the critic head).
            temperature (`float`): softmax temperature; 0 is greedy.
            top_p (`float`): nucleus sampling threshold in `(0, 1]`.
            seed (`int`, *optional*): seed of a private generator (same seed, same output); default: torch's
                global generator.
            critic_threshold (`float`): critic probability of "wrong" above which a token may be re-masked.
            critic_remask_fraction (`float`): at most this share (rounded up) of the tokens the previous step
                committed is re-masked at a step, in `[0, 1]` (the last step never re-masks, so all masks get filled).
            threshold (`float`, *optional*): the confidence threshold of `sampler="threshold"` (default 0.9); above
                1, one token per step.
            block_size (`int`, *optional*): decode in blocks of this many tokens, left to right (naive or threshold;
                must divide `max_new_tokens`; with naive, `steps` a multiple of the number of blocks).
            use_prefix_cache (`bool`): reuse, within a block, the keys/values of every position outside it from the
                block's first pass (Fast-dLLM's approximate cache; naive or threshold).
            cache_refresh_every (`int`, *optional*): with the cache, recompute it every this many steps of a block
                (1: every step, exact); default once per block.
            output_history / return_dict_in_generate (`bool`): return a [`DiffusionGenerateOutput`] (with the
                per-step sequences and waves when `output_history`).

        Returns:
            The sequences `(batch, prompt + max_new_tokens)`, or a [`DiffusionGenerateOutput`].

        Raises:
            ValueError: a missing mask token, `max_new_tokens` or `steps` out of range, prompt + new tokens longer
                than `max_position_embeddings`, an unknown sampler, a head the model lacks, or decoding options
                the sampler does not take.
        """
        config = self.config
        mask_id = config.mask_token_id
        if mask_id is None:
            raise ValueError("config.mask_token_id is not set: masked diffusion generation needs a mask token")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, prompt), got {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        requested_steps = steps
        steps = max_new_tokens if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= max_new_tokens:
            raise ValueError(f"steps must be an integer in [1, max_new_tokens={max_new_tokens}] (at least one "
                             f"token per step), got {steps!r}")
        batch, prompt_length = input_ids.shape
        total = prompt_length + max_new_tokens
        if total > config.max_position_embeddings:
            raise ValueError(f"the prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) is {total} "
                             "tokens, longer than the context "
                             f"(max_position_embeddings={config.max_position_embeddings})")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "auto":
            sampler = "wavefront" if self.sampler_head is not None else "naive"
        if sampler == "wavefront" and self.sampler_head is None:
            raise ValueError("sampler='wavefront' needs the sampler head, but this model has none "
                             "(config.add_sampler_head=False): use sampler='naive'")
        if use_critic and self.critic_head is None:
            raise ValueError("use_critic=True needs the critic head, but this model has none "
                             "(config.add_critic_head=False)")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        if not 0 <= critic_threshold <= 1 or not 0 <= critic_remask_fraction <= 1:
            raise ValueError(f"critic_threshold and critic_remask_fraction must lie in [0, 1], got "
                             f"{critic_threshold} and {critic_remask_fraction}")
        if bool((input_ids == mask_id).any()):
            raise ValueError("the prompt contains the mask token; mask-infilling prompts are not supported")
        from .decoding import check_decoding_options, decode  # decoding.py builds on this module

        use_decoder = check_decoding_options(
            config, sampler=sampler, steps=requested_steps, max_new_tokens=max_new_tokens, use_critic=use_critic,
            threshold=threshold, block_size=block_size, use_prefix_cache=use_prefix_cache,
            cache_refresh_every=cache_refresh_every,
        )

        device = input_ids.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        valid = torch.cat((prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)), dim=1).bool()
        position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        generated = torch.zeros(batch, total, dtype=torch.bool, device=device)
        generated[:, prompt_length:] = True
        x = torch.cat((input_ids, input_ids.new_full((batch, max_new_tokens), mask_id)), dim=1)
        sample = TokenSampler(temperature, top_p, mask_id, generator)
        if use_decoder:
            output = decode(self, x, valid=valid, position_ids=position_ids, prompt_length=prompt_length,
                            sampler=sampler, steps=steps, sample=sample, threshold=threshold, block_size=block_size,
                            use_prefix_cache=use_prefix_cache, cache_refresh_every=cache_refresh_every,
                            output_history=output_history)
            return output if return_dict_in_generate or output_history else output.sequences

        history, waves = [], []
        num_remasked = torch.zeros(batch, dtype=torch.long, device=device)
        committed_last = torch.zeros(batch, dtype=torch.long, device=device)
        for step in range(steps):
            outputs = self(input_ids=x, attention_mask=valid.long(), position_ids=position_ids)
            fillable = x == mask_id  # masked at the time of this pass: its logits are valid predictions
            if use_critic and step < steps - 1:
                limit = torch.ceil(committed_last * critic_remask_fraction).long()
                remask = self._critic_remask(outputs.last_hidden_state, x, generated, limit, critic_threshold)
                x = x.masked_fill(remask, mask_id)
                num_remasked += remask.sum(dim=1)
            budget = ceil_div((x == mask_id).sum(dim=1), steps - step).clamp(max=fillable.sum(dim=1))
            if sampler == "naive":
                tokens, confidence = sample.at(outputs.logits[fillable], fillable, fill_value=mask_id)
                chosen = top_k_per_row(confidence, fillable, budget)
                x = torch.where(chosen, tokens, x)
                step_waves = ()
            else:
                x, step_waves = wavefront_fill(
                    self, x, outputs, fillable=fillable, budget=budget, valid=valid, sample=sample,
                    bootstrap_ratio=config.sampler_min_neighbors_ratio,
                )
            committed_last = budget
            if output_history:
                history.append(x.clone())
                waves.append(step_waves)
        if bool((x == mask_id).any()):
            raise RuntimeError("internal error: masks remain after the last step")
        if not (return_dict_in_generate or output_history):
            return x
        return DiffusionGenerateOutput(
            sequences=x,
            history=tuple(history) if output_history else None,
            waves=tuple(waves) if output_history and sampler == "wavefront" else None,
            num_remasked=num_remasked,
            num_model_calls=torch.full((batch,), steps, device=device),
            num_tokens_processed=torch.full((batch,), steps * total, device=device),
        )

    def _critic_remask(
        self, hidden_states: torch.Tensor, x: torch.Tensor, generated: torch.Tensor, limit: torch.Tensor,
        threshold: float,
    ) -> torch.Tensor:
        """Positions to re-mask: generated, filled tokens whose critic probability of being wrong exceeds
        `threshold`, worst first, at most `limit` per row."""
        wrong = torch.sigmoid(self.critic_logits(hidden_states))
        candidates = generated & (x != self.config.mask_token_id) & (wrong > threshold)
        return top_k_per_row(wrong, candidates, limit)


__all__ = [
    "DiffusionGenerateOutput",
    "MaskedDiffusionForMaskedLM",
    "MaskedDiffusionLMOutput",
    "MaskedDiffusionModel",
    "MaskedDiffusionPreTrainedModel",
]
