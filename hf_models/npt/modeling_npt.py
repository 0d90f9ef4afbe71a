"""The Neuro-Plastic Transformer (NPT, seed 004) as a Hugging Face Llama whose chosen layers are NPT layers.

The whole math of an NPT layer (notation: `h` the layer input `(batch, seq, hidden)`, LN1/LN2 the layer's
`input_layernorm` / `post_attention_layernorm`, `MLP(x) = W_d (silu(W_g x) * W_u x)`):

    a   = Attn(LN1(h))                         the layer's unchanged attention (same KV cache, RoPE and mask)
    x   = LN2(h)          (np_mlp_input="h", the original)   or   LN2(h + a)   ("h_plus_attn")
    for each of the k components j (np_num_ranks) of a modulated projection P with input q:
        z_j   = act(a W_down_j)                    (r = np_rank; act = identity unless np_generator="mlp")
        v_a_j = A_j z_j (+ c_a_j)   in R^{n_in}    v_b_j = B_j z_j (+ c_b_j)   in R^{n_out}   (biases: "affine")
        s_j   = <v_a_j, q>                          one scalar per token and component
    P'(q) = W_P q + alpha * sum_j s_j v_b_j        = (W_P + alpha * sum_j v_b_j v_a_j^T) q
    gate and up take q = x; down takes q = silu(g') * u'  (np_modulation: gate / gate_up / gate_up_down)
    out = h + MLP'(x)          (np_residual_mode="replace": attention reaches the stream only via the modulation)
    out = h + a + MLP'(x)      ("keep")

The per-token weight update `sum_j v_b_j v_a_j^T` (n_out x n_in) is never built. With `z` the concatenation of
the `z_j` (batch, seq, k*r) and the stacked matrices `W_A = [A_1 ... A_k]` (n_in, k*r), `W_B = [B_1 ... B_k]`
(n_out, k*r): `s_j = <z_j, (q W_A)_j>` (an r-dim dot; `v_a` is never built) and `sum_j s_j v_b_j = W_B (s ⊙ z)`:
one GEMM per projection. Squared norms of `v_a`, `v_b` (for regularisers) come from r x r Gram matrices. The
scalars and the generator run in float32 when `np_fp32_modulation` (the default).

With the bias-free linear generator `v_a(-a) = -v_a(a)` and `v_b(-a) = -v_b(a)`, so every term `s_j v_b_j` is an
even function of `a`: the first-order (odd) effect of the attention can only be approximated. `"affine"` adds the
biases `c_a`, `c_b` (terms linear in `a`); `"mlp"` adds a nonlinearity.

`with model.npt_disabled():` turns NPT layers back into exact Llama layers (the distillation teacher, with no second
copy of the weights); `NPTForCausalLM.from_llama` converts a base Llama, `to_llama` / `save_as_llama` return it,
`extract_modulation` / `fold_modulation` / `revert_edits` make a per-token update permanent in the MLP weights.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg
from transformers import AutoConfig, LlamaForCausalLM, LlamaModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple

from ..modeling_zoo_common import ZooPreTrainedModel, few_rows_linear
from .configuration_npt import NPTConfig
from .adapter_npt import NPTAdapterMixin
from .folding_npt import NPTFoldingMixin




class NPModulator(nn.Module):
    """The generator of one modulated projection: attention output `a` and projection input `q` → modulation.

    Parameters (all `nn.Linear`, so PEFT, quantisers and TP plans understand them): `down` (hidden → k·r, or → r
    when the bottleneck is shared), `a_up` with weight `W_A` (n_in, k·r) and `b_up` with weight `W_B` (n_out, k·r);
    block `j` of `W_A` / `W_B` is component `j`'s `A_j` / `B_j`. The affine generator adds `a_bias` (k, n_in) and
    `b_bias` (k, n_out).

    Args:
        hidden_size: width `d` of the attention output.
        in_features / out_features: `n_in` / `n_out` of the modulated projection.
        rank: bottleneck width `r`.
        num_ranks: number of components `k`.
        generator: `"linear"`, `"affine"` or `"mlp"`.
        activation: activation after the bottleneck (`"mlp"` generator only).
        shared_bottleneck: one `down` shared by the `k` components.
        variational: the bottleneck is a Gaussian code `z = mu + sigma * eps`, `mu = act(a W_down)`, with a learned
            per-unit `sigma = exp(log_sigma)` and noise in training mode only (evaluation decodes from `mu`); its KL
            to N(0, I) is `code_kl` (the `ib_impl="vib"` loss).
    """

    def __init__(self, hidden_size: int, in_features: int, out_features: int, rank: int, num_ranks: int,
                 generator: str = "linear", activation: str | None = None, shared_bottleneck: bool = False,
                 variational: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.in_features, self.out_features = hidden_size, in_features, out_features
        self.rank, self.num_ranks, self.shared_bottleneck = rank, num_ranks, shared_bottleneck
        self.down = nn.Linear(hidden_size, rank if shared_bottleneck else rank * num_ranks, bias=False)
        self.a_up = nn.Linear(rank * num_ranks, in_features, bias=False)
        self.b_up = nn.Linear(rank * num_ranks, out_features, bias=False)
        self.act = ACT2FN[activation or "relu"] if generator == "mlp" else None
        if generator == "affine":
            self.a_bias = nn.Parameter(torch.zeros(num_ranks, in_features))
            self.b_bias = nn.Parameter(torch.zeros(num_ranks, out_features))
        else:
            self.a_bias = self.b_bias = None
        self.log_sigma = nn.Parameter(torch.zeros(self.down.out_features)) if variational else None

    def extra_repr(self) -> str:
        return (f"d={self.hidden_size}, n_in={self.in_features}, n_out={self.out_features}, r={self.rank}, "
                f"k={self.num_ranks}, shared_bottleneck={self.shared_bottleneck}")

    def code_mean(self, attn_output: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`mu = act(a W_down)` `(batch, seq, r or k*r)`, before any sharing across components."""
        dtype = dtype or attn_output.dtype
        z = F.linear(attn_output.to(dtype), self.down.weight.to(dtype))
        return self.act(z) if self.act is not None else z

    def code_kl(self, attn_output: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma²) ‖ N(0, I)) of the variational code per token, `(batch, seq)`, in float32:
        `½ Σ_i (mu_i² + sigma_i² - 1 - 2 log sigma_i)`."""
        if self.log_sigma is None:
            raise ValueError("this generator's bottleneck is not variational (set np_variational=True)")
        mean = self.code_mean(attn_output, torch.float32)
        log_sigma = self.log_sigma.float()
        return 0.5 * (mean.pow(2) + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)

    def bottleneck(self, attn_output: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`z = act(a W_down)` of every component, concatenated: `(batch, seq, k*r)`; a variational code adds
        `sigma * eps` in training mode."""
        z = self.code_mean(attn_output, dtype)
        if self.log_sigma is not None and self.training:
            z = z + self.log_sigma.to(z.dtype).exp() * torch.randn_like(z)
        if self.shared_bottleneck and self.num_ranks > 1:
            z = z.repeat(*([1] * (z.dim() - 1)), self.num_ranks)
        return z

    def forward(self, attn_output: torch.Tensor, q: torch.Tensor, compute_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The modulation `sum_j s_j v_b_j` without building `v_a`, `v_b` or any per-token matrix.

        Args:
            attn_output: the attention output `a`, `(batch, seq, hidden)`.
            q: the projection's input, `(batch, seq, n_in)`.
            compute_dtype: dtype of the computation (default: `q`'s).

        Returns:
            `(m, s, z)`: the modulation `(batch, seq, n_out)` in `compute_dtype`, the scalars `s`
            `(batch, seq, k)` and the bottleneck `z` `(batch, seq, k*r)`.
        """
        dtype = compute_dtype or q.dtype
        z = self.bottleneck(attn_output, dtype)
        q = q.to(dtype)
        projected = q @ self.a_up.weight.to(dtype)  # (batch, seq, k*r): block j is A_j^T q
        s = (projected * z).unflatten(-1, (self.num_ranks, self.rank)).sum(-1)
        if self.a_bias is not None:
            s = s + q @ self.a_bias.to(dtype).T
        weighted = (s.unsqueeze(-1) * z.unflatten(-1, (self.num_ranks, self.rank))).flatten(-2)
        m = F.linear(weighted, self.b_up.weight.to(dtype))
        if self.b_bias is not None:
            m = m + s @ self.b_bias.to(dtype)
        return m, s, z

    def vectors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise `v_a` `(..., k, n_in)` and `v_b` `(..., k, n_out)` from the bottleneck `z` (inspection and
        losses only; the forward pass never needs them)."""
        zk = z.unflatten(-1, (self.num_ranks, self.rank))
        dtype = z.dtype
        v_a = torch.einsum("...kr,nkr->...kn", zk, self.a_up.weight.to(dtype).unflatten(1, (self.num_ranks, self.rank)))
        v_b = torch.einsum("...kr,nkr->...kn", zk, self.b_up.weight.to(dtype).unflatten(1, (self.num_ranks, self.rank)))
        if self.a_bias is not None:
            v_a = v_a + self.a_bias.to(dtype)
            v_b = v_b + self.b_bias.to(dtype)
        return v_a, v_b

    def squared_norms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`‖v_a_j‖²` and `‖v_b_j‖²` per token and component, `(..., k)` each, through the r x r Gram matrices
        (`‖A z + c‖² = zᵀ(AᵀA)z + 2 zᵀAᵀc + ‖c‖²`), without building `v_a` / `v_b`."""
        zk = z.unflatten(-1, (self.num_ranks, self.rank))
        norms = []
        for linear, bias in ((self.a_up, self.a_bias), (self.b_up, self.b_bias)):
            blocks = linear.weight.to(z.dtype).unflatten(1, (self.num_ranks, self.rank))  # (n, k, r)
            gram = torch.einsum("nkr,nks->krs", blocks, blocks)
            norm = torch.einsum("...kr,krs,...ks->...k", zk, gram, zk)
            if bias is not None:
                bias = bias.to(z.dtype)
                norm = norm + 2 * torch.einsum("...kr,nkr,kn->...k", zk, blocks, bias) + bias.pow(2).sum(-1)
            norms.append(norm)
        return norms[0], norms[1]

    @torch.no_grad()
    def init_np_weights(self, mode: str, scale: float) -> None:
        """Initialise the generator (`NPTConfig.np_init`), through the guarded helpers of
        `transformers.initialization` so that loaded weights are never overwritten.

        `improved`: `W_down` Xavier-uniform per component; `A_0` = the rectangular identity (tiled when r > n_in) +
        N(0, 0.1²); `B_0` ~ N(0, (0.1·sqrt(2/(r+n_out)))²). `conservative`: `A_0` = 0.3·identity + N(0, 0.01²),
        `B_0` ~ U(±scale). `uniform`: every `A_j`, `B_j` ~ U(±scale). `zero_b`: `improved` with `B = 0` (zero
        modulation). Components j > 0 (improved / conservative / zero_b / pca): orthogonal `A_j` with gain `scale`,
        `B_j` with gain `0.1·scale`. Biases start at zero.
        """
        r, k = self.rank, self.num_ranks
        blocks = 1 if self.shared_bottleneck else k
        down = torch.empty(blocks * r, self.hidden_size)
        for j in range(blocks):
            nn.init.xavier_uniform_(down[j * r:(j + 1) * r])
        init.copy_(self.down.weight, down)
        a_weight = torch.empty(self.in_features, k * r)
        b_weight = torch.empty(self.out_features, k * r)
        if mode == "uniform":
            nn.init.uniform_(a_weight, -scale, scale)
            nn.init.uniform_(b_weight, -scale, scale)
        else:
            identity = torch.zeros(self.in_features, r)
            identity[torch.arange(r) % self.in_features, torch.arange(r)] = 1.0
            if mode == "conservative":
                a_weight[:, :r] = 0.3 * identity + 0.01 * torch.randn(self.in_features, r)
                nn.init.uniform_(b_weight[:, :r], -scale, scale)
            else:
                a_weight[:, :r] = identity + 0.1 * torch.randn(self.in_features, r)
                b_weight[:, :r] = 0.1 * (2.0 / (r + self.out_features)) ** 0.5 * torch.randn(self.out_features, r)
            for j in range(1, k):
                nn.init.orthogonal_(a_weight[:, j * r:(j + 1) * r], gain=scale)
                nn.init.orthogonal_(b_weight[:, j * r:(j + 1) * r], gain=0.1 * scale)
        if mode == "zero_b":
            b_weight.zero_()
        init.copy_(self.a_up.weight, a_weight)
        init.copy_(self.b_up.weight, b_weight)
        if self.a_bias is not None:
            init.zeros_(self.a_bias)
            init.zeros_(self.b_bias)
        if self.log_sigma is not None:
            init.constant_(self.log_sigma, math.log(0.1))


@dataclass
class NPTProjectionRecord:
    """What one modulated projection of one NPT layer computed (per token).

    Attributes:
        q: the projection's input `(batch, seq, n_in)`.
        s: the scalars `<v_a_j, q>` `(batch, seq, k)` (compute dtype).
        z: the bottleneck `(batch, seq, k*r)` (compute dtype); `modulator.vectors(z)` gives `v_a`, `v_b`.
        m: the modulation added to the projection, `np_alpha * sum_j s_j v_b_j`, `(batch, seq, n_out)`.
        modulator: the `NPModulator` that produced it.
    """

    q: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    m: torch.Tensor
    modulator: NPModulator


@dataclass
class NPTLayerRecord:
    """The tensors of one NPT layer's forward pass (`output_npt=True`), all `(batch, seq, ·)`.

    Attributes:
        hidden_in: the layer input `h`.
        attn_output: the attention output `a`.
        mlp_input: the MLP input `x` (`LN2(h)` or `LN2(h + a)`).
        mlp_output: the modulated MLP's output `y` (the layer adds `h`, and `a` in keep mode).
        hidden_out: the layer output.
        projections: the record of each modulated projection (`"gate"`, `"up"`, `"down"`).
    """

    hidden_in: torch.Tensor
    attn_output: torch.Tensor
    mlp_input: torch.Tensor
    mlp_output: torch.Tensor | None = None
    hidden_out: torch.Tensor | None = None
    projections: dict[str, NPTProjectionRecord] = field(default_factory=dict)


@dataclass
class NPTCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `npt`: `{layer index: NPTLayerRecord}` when `output_npt=True`."""

    npt: dict[int, NPTLayerRecord] | None = None


class NPTDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention output drives per-token low-rank updates of its MLP (see the module
    docstring). With `npt_active = False` (set by `npt_disabled()`) or when it is not in `npt_enabled_layers`, it
    runs exactly `LlamaDecoderLayer.forward`."""

    def __init__(self, config: NPTConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        sizes = {"gate": (config.hidden_size, config.intermediate_size),
                 "up": (config.hidden_size, config.intermediate_size),
                 "down": (config.intermediate_size, config.hidden_size)}
        self.np_component = nn.ModuleDict({
            name: NPModulator(config.hidden_size, *sizes[name], config.np_rank, config.np_num_ranks,
                              config.np_generator, config.np_generator_act, config.np_shared_bottleneck,
                              config.np_variational)
            for name in config.np_projections
        })
        self.npt_active = True
        self.npt_record: NPTLayerRecord | None = None
        self._recording = False

    @property
    def npt_enabled(self) -> bool:
        """Whether this layer runs as an NPT layer now (`npt_active` and in `config.npt_enabled_layers`)."""
        enabled = self.config.npt_enabled_layers
        return self.npt_active and (enabled is None or self.layer_idx in enabled)

    def _modulate(self, name: str, attn_output: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.float32 if self.config.np_fp32_modulation else q.dtype
        m, s, z = self.np_component[name](attn_output, q, compute_dtype)
        if self.config.np_alpha != 1.0:
            m = self.config.np_alpha * m
        if self._recording:
            self.npt_record.projections[name] = NPTProjectionRecord(q=q, s=s, z=z, m=m,
                                                                    modulator=self.np_component[name])
        return m.to(q.dtype)

    def modulated_mlp(self, x: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """`MLP'(x)`: the layer's MLP with the per-token updates of the modulated projections, `(batch, seq, d)`."""
        mlp = self.mlp
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if "gate" in self.np_component:
            gate = gate + self._modulate("gate", attn_output, x)
        if "up" in self.np_component:
            up = up + self._modulate("up", attn_output, x)
        intermediate = mlp.act_fn(gate) * up
        out = mlp.down_proj(intermediate)
        if "down" in self.np_component:
            out = out + self._modulate("down", attn_output, intermediate)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.npt_enabled:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
        if position_embeddings is None:
            raise ValueError("NPTDecoderLayer needs the rotary `position_embeddings` computed by the model.")
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        mlp_in = hidden_states + attn_output if self.config.np_mlp_input == "h_plus_attn" else hidden_states
        x = self.post_attention_layernorm(mlp_in)
        if self._recording:
            self.npt_record = NPTLayerRecord(hidden_in=hidden_states, attn_output=attn_output, mlp_input=x)
        mlp_output = self.modulated_mlp(x, attn_output)
        residual = hidden_states + attn_output if self.config.np_residual_mode == "keep" else hidden_states
        out = residual + mlp_output
        if self._recording:
            self.npt_record.mlp_output, self.npt_record.hidden_out = mlp_output, out
        return out


class NPTPreTrainedModel(ZooPreTrainedModel, LlamaPreTrainedModel):
    """Weights initialisation and the Hugging Face plumbing shared by the NPT models."""

    config_class = NPTConfig
    config: NPTConfig
    _no_split_modules = ["LlamaDecoderLayer", "NPTDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, NPModulator):
            module.init_np_weights(self.config.np_init, self.config.np_init_scale)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # For custom code, transformers skips modules whose own (non-recursive) parameters are all loaded, which
        # includes every module without parameters of its own such as a linear `NPModulator`; its init is guarded
        # per parameter (`transformers.initialization`), so it must always run.
        if isinstance(module, NPModulator) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)


class NPTModel(NPTPreTrainedModel, LlamaModel):
    """`LlamaModel` whose layers `config.npt_layers` are `NPTDecoderLayer`s (the forward is Llama's)."""

    def __init__(self, config: NPTConfig) -> None:
        super(LlamaModel, self).__init__(config)  # LlamaModel.__init__ would build plain layers and post_init
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        npt_layers = set(config.npt_layers)
        self.layers = nn.ModuleList([
            (NPTDecoderLayer if index in npt_layers else LlamaDecoderLayer)(config, index)
            for index in range(config.num_hidden_layers)
        ])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class NPTForCausalLM(NPTAdapterMixin, NPTFoldingMixin, NPTPreTrainedModel, LlamaForCausalLM):
    """A `LlamaForCausalLM` whose chosen layers are NPT layers; generation uses the normal Llama KV cache (an NPT
    layer's modulation at step t depends only on its attention output and MLP input at t)."""

    def __init__(self, config: NPTConfig) -> None:
        super(LlamaForCausalLM, self).__init__(config)
        self.model = NPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.npt_edit_log: list[dict[str, Any]] = []
        self._npt_originals: dict[tuple[int, str], torch.Tensor] = {}
        self.post_init()

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def npt_layers(self) -> dict[int, NPTDecoderLayer]:
        """`{index: layer}` of the NPT layers."""
        return {layer.layer_idx: layer for layer in self.model.layers if isinstance(layer, NPTDecoderLayer)}

    def np_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`(name, parameter)` of every NP-component parameter (what distillation trains)."""
        return ((name, p) for name, p in self.named_parameters() if ".np_component." in name)

    @contextlib.contextmanager
    def npt_disabled(self, layers: Sequence[int] | None = None) -> Iterator[NPTForCausalLM]:
        """Run the given NPT layers (default: all) as exact Llama layers inside the block (the teacher)."""
        chosen = [layer for index, layer in self.npt_layers.items() if layers is None or index in layers]
        previous = [layer.npt_active for layer in chosen]
        for layer in chosen:
            layer.npt_active = False
        try:
            yield self
        finally:
            for layer, active in zip(chosen, previous):
                layer.npt_active = active

    @contextlib.contextmanager
    def npt_alpha(self, alpha: float) -> Iterator[NPTForCausalLM]:
        """Scale every modulation by `alpha` inside the block (`0`: the NPT structure without modulation, i.e. the
        "attention deleted" baseline in replace mode)."""
        previous = self.config.np_alpha
        self.config.np_alpha = float(alpha)
        try:
            yield self
        finally:
            self.config.np_alpha = previous

    @contextlib.contextmanager
    def _record_npt(self) -> Iterator[dict[int, NPTLayerRecord]]:
        records: dict[int, NPTLayerRecord] = {}
        layers = self.npt_layers
        for layer in layers.values():
            layer._recording, layer.npt_record = True, None
        try:
            yield records
        finally:
            for index, layer in layers.items():
                if layer.npt_record is not None:
                    records[index] = layer.npt_record
                layer._recording, layer.npt_record = False, None

    # ------------------------------------------------------------------------------------------------- forward
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
        output_npt: bool = False,
        **kwargs: Any,
    ) -> NPTCausalLMOutputWithPast:
        r"""Llama's causal-LM forward; `output_npt=True` adds `npt`, the `NPTLayerRecord` of every NPT layer that
        ran as NPT (attention output, MLP input, scalars, bottlenecks, modulations, layer output)."""
        with self._record_npt() if output_npt else contextlib.nullcontext() as records:
            outputs = self.model(
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
        logits = few_rows_linear(self.lm_head, hidden_states)
        loss = self.causal_lm_loss(logits, labels, **kwargs)
        return NPTCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            npt=records,
        )

    # ---------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_llama(cls, llama: LlamaForCausalLM | str | os.PathLike, **npt_fields: Any) -> NPTForCausalLM:
        """Convert a base Llama (a model, or a folder / Hub id of one) into an NPT model.

        The base weights are copied (folding an update into this model never edits `llama`) and the NP components
        are initialised by `np_init`.

        Raises:
            ValueError: the checkpoint is not a Llama (checked on its config, before any weight is read), an NPT
                field is invalid, or the base's state dict does not match (anything but the NP keys missing).
        """
        if isinstance(llama, (str, os.PathLike)):
            base_config = AutoConfig.from_pretrained(llama)
            if base_config.model_type != "llama":
                raise ValueError(f"NPT converts Llama checkpoints only; '{llama}' is a '{base_config.model_type}'.")
            NPTConfig.from_llama_config(base_config, **npt_fields)  # validate the NPT fields before loading
            llama = LlamaForCausalLM.from_pretrained(llama)
        if not isinstance(llama, LlamaForCausalLM) or isinstance(llama, NPTForCausalLM):
            raise ValueError(f"NPT converts a plain LlamaForCausalLM; got {type(llama).__name__}.")
        config = NPTConfig.from_llama_config(llama.config, **npt_fields)
        config._attn_implementation = llama.config._attn_implementation
        model = cls(config).to(device=llama.device, dtype=llama.dtype)
        result = model.load_state_dict(llama.state_dict(), strict=False)
        np_keys = {name for name in model.state_dict() if ".np_component." in name}
        if set(result.missing_keys) != np_keys or result.unexpected_keys:
            raise ValueError(f"the base state dict does not match: missing {sorted(set(result.missing_keys) - np_keys)}"
                             f", unexpected {result.unexpected_keys}")
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.train(llama.training)

    @classmethod
    def from_base_pretrained(cls, path: str | os.PathLike, **npt_fields: Any) -> NPTForCausalLM:
        """`from_llama` of a saved base Llama folder (or Hub id)."""
        return cls.from_llama(path, **npt_fields)

    def to_llama(self) -> LlamaForCausalLM:
        """A plain `LlamaForCausalLM` with this model's base weights (copied, including folded edits)."""
        llama = LlamaForCausalLM(self.config.to_llama_config())
        llama.config._attn_implementation = self.config._attn_implementation
        state = {name: tensor for name, tensor in self.state_dict().items() if ".np_component." not in name}
        llama.load_state_dict(state, strict=True)
        return llama.to(self.dtype).train(self.training)

    def save_as_llama(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Save `to_llama()` (loadable by `LlamaForCausalLM.from_pretrained`) and return the folder."""
        self.to_llama().save_pretrained(save_directory, **kwargs)
        return Path(save_directory)

    @torch.no_grad()
    def initialize_np_from_pca(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> None:
        """`np_init="pca"`: set component 0 of every gate/up generator so that `v_a` is the projection of `a` onto
        its top-`r` principal (uncentred) directions on these calibration tokens: `W_down = U_rᵀ`, `A_0 = U_r`."""
        with self._record_npt() as records:
            self(input_ids, attention_mask=attention_mask)
        valid = None if attention_mask is None else attention_mask.bool()
        for index, record in records.items():
            a = record.attn_output if valid is None else record.attn_output[valid]
            a = a.reshape(-1, a.shape[-1]).float()
            directions = torch.linalg.svd(a, full_matrices=False).Vh  # (min(N, d), d)
            for name, modulator in self.npt_layers[index].np_component.items():
                if modulator.in_features != self.config.hidden_size:
                    continue
                count = min(modulator.rank, directions.shape[0])
                modulator.down.weight[:modulator.rank].zero_()
                modulator.down.weight[:count] = directions[:count].to(modulator.down.weight.dtype)
                modulator.a_up.weight[:, :modulator.rank].zero_()
                modulator.a_up.weight[:, :count] = directions[:count].T.to(modulator.a_up.weight.dtype)


__all__ = [
    "NPModulator",
    "NPTCausalLMOutputWithPast",
    "NPTDecoderLayer",
    "NPTForCausalLM",
    "NPTLayerRecord",
    "NPTModel",
    "NPTPreTrainedModel",
    "NPTProjectionRecord",
]
