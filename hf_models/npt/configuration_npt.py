"""Configuration of the Neuro-Plastic Transformer (NPT, seed 004): a Llama whose chosen decoder layers feed their
attention output into a small generator that writes per-token low-rank updates of the MLP weights.

`NPTConfig` is a `LlamaConfig` (every base field keeps its meaning and default) plus the `np_*` / `npt_*` fields
below; `NPTConfig.from_llama_config(llama_config, **npt_fields)` builds one from a base checkpoint's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import LlamaConfig

from ..configuration_zoo_common import RemoteCodeConfigMixin, check_bool, check_choice, check_positive

NP_MODULATIONS = {"gate": ("gate",), "gate_up": ("gate", "up"), "gate_up_down": ("gate", "up", "down")}
NP_RESIDUAL_MODES = ("replace", "keep")
NP_MLP_INPUTS = ("h", "h_plus_attn")
NP_GENERATORS = ("linear", "affine", "mlp")
NP_GENERATOR_ACTS = ("relu", "silu", "gelu", "tanh")
NP_INITS = ("improved", "conservative", "uniform", "zero_b", "pca")
_BASE_ONLY_KEYS = ("model_type", "transformers_version", "architectures", "auto_map")


def resolve_npt_layers(spec: Any, num_layers: int) -> list[int]:
    """Turn a layer selection into sorted, unique, non-negative layer indices.

    `spec` may be `None` or `"upper_half"` (layers `num_layers // 2 ...`, the original repository's default),
    `"all"`, a slice string `"a:b"` (Python semantics, negatives allowed), an `int`, or a sequence of ints
    (negatives count from the end).

    Raises:
        ValueError: an index is out of range or `spec` has another form (the message names `npt_layers`).
    """
    if spec is None or spec == "upper_half":
        return list(range(num_layers // 2, num_layers))
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        start, sep, stop = spec.partition(":")
        try:
            if not sep:
                raise ValueError
            bounds = slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
        except ValueError:
            raise ValueError(
                f"`npt_layers` must be 'upper_half', 'all', 'a:b', an int or a list of ints, got {spec!r}."
            ) from None
        return list(range(num_layers))[bounds]
    items = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if not isinstance(items, Sequence) or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ValueError(f"`npt_layers` must be 'upper_half', 'all', 'a:b', an int or a list of ints, got {spec!r}.")
    resolved = set()
    for index in items:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"`npt_layers` index {index} is out of range for a model of {num_layers} layers.")
        resolved.add(index % num_layers)
    return sorted(resolved)


class NPTConfig(RemoteCodeConfigMixin, LlamaConfig):
    r"""Configuration of an [`NPTForCausalLM`]: a [`LlamaConfig`] plus the neuro-plastic fields.

    In an NPT layer the attention output `a` no longer enters the residual stream directly (mode `"replace"`) or
    enters it unchanged (mode `"keep"`); in both modes it drives a generator that turns `a` into `k` pairs of
    vectors `(v_a, v_b)` per token, and each modulated MLP projection `P` computes `W_P q + sum_j (v_a_j . q) v_b_j`,
    i.e. it uses the per-token weight `W_P + sum_j v_b_j v_a_j^T` (never materialised).

    Args:
        npt_layers (`list[int]` or `str`, *optional*): the layers that become NPT layers: indices (negatives count
            from the end), `"upper_half"` (default), `"all"` or `"a:b"`. Stored resolved, sorted and unique.
        np_rank (`int`, *optional*, defaults to 64): bottleneck width `r` of the generator (used verbatim).
        np_num_ranks (`int`, *optional*, defaults to 1): number `k` of rank-1 components per token.
        np_modulation (`str`, *optional*, defaults to `"gate"`): which MLP projections are modulated: `"gate"`,
            `"gate_up"` or `"gate_up_down"`.
        np_residual_mode (`str`, *optional*, defaults to `"replace"`): `"replace"`: `out = h + MLP_mod(x)` (the
            attention reaches the stream only through the modulation); `"keep"`: `out = h + a + MLP_mod(x)`.
        np_mlp_input (`str`, *optional*, defaults to `"h"`): the MLP input `x`: `"h"` = `LN2(h)` (the original) or
            `"h_plus_attn"` = `LN2(h + a)` (with `"keep"` and a zero modulation this is exactly the base layer).
        np_generator (`str`, *optional*, defaults to `"linear"`): `"linear"` (the original, bias-free: the
            modulation is an even function of `a`), `"affine"` (adds biases to `v_a` and `v_b`, so the modulation
            gets a term linear in `a`) or `"mlp"` (an activation after the bottleneck).
        np_generator_act (`str`, *optional*): activation of the `"mlp"` generator (`relu`, `silu`, `gelu`, `tanh`;
            default `relu`); must stay `None` for the other generators.
        np_shared_bottleneck (`bool`, *optional*, defaults to `False`): one bottleneck `W_down` shared by the `k`
            components instead of one per component.
        np_init (`str`, *optional*, defaults to `"improved"`): initialisation of the generator: `"improved"`,
            `"conservative"` (the original's single-layer modes), `"uniform"` (its multi-layer mode), `"zero_b"`
            (`W_b = 0`: the modulation is exactly zero at the start) or `"pca"` (`"improved"` until
            `NPTForCausalLM.initialize_np_from_pca` sets the bottleneck to the attention output's top-`r` principal
            directions).
        np_init_scale (`float`, *optional*, defaults to 0.01): scale of the uniform / orthogonal parts of the init.
        np_alpha (`float`, *optional*, defaults to 1.0): multiplier of every modulation (injection strength knob;
            0 switches the modulation off while keeping the NPT residual structure).
        np_variational (`bool`, *optional*, defaults to `False`): the bottleneck `z` is a Gaussian code `mu + sigma
            * eps` with a learned per-unit `sigma` (initialised to 0.1) and noise in training only, so that the
            information-bottleneck loss `ib_impl="vib"` (its KL to N(0, I)) cannot be lowered for free by rescaling
            `W_down` against `W_A`, `W_B`.
        np_fp32_modulation (`bool`, *optional*, defaults to `True`): compute the generator and the scalars in
            float32 whatever the activation dtype.
        npt_enabled_layers (`list[int]`, *optional*): the subset of `npt_layers` that runs as NPT at run time
            (the others behave exactly like Llama layers); `None` = all of them.
        vocab_size, hidden_size, ..., head_dim: the [`LlamaConfig`] fields, keyword-only, with Llama's meanings
            and defaults (explicit, so tools that read the signature see them).
        kwargs: the generic [`PreTrainedConfig`] fields (`output_hidden_states`, `return_dict`, `dtype`, ...).
    """

    model_type = "npt_llama"

    def __init__(
        self,
        npt_layers: Any = None,
        np_rank: int = 64,
        np_num_ranks: int = 1,
        np_modulation: str = "gate",
        np_residual_mode: str = "replace",
        np_mlp_input: str = "h",
        np_generator: str = "linear",
        np_generator_act: str | None = None,
        np_shared_bottleneck: bool = False,
        np_init: str = "improved",
        np_init_scale: float = 0.01,
        np_alpha: float = 1.0,
        np_fp32_modulation: bool = True,
        np_variational: bool = False,
        npt_enabled_layers: list[int] | None = None,
        *,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pretraining_tp: int | None = 1,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        head_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive("np_rank", np_rank)
        check_positive("np_num_ranks", np_num_ranks)
        check_choice("np_modulation", np_modulation, NP_MODULATIONS)
        check_choice("np_residual_mode", np_residual_mode, NP_RESIDUAL_MODES)
        check_choice("np_mlp_input", np_mlp_input, NP_MLP_INPUTS)
        check_choice("np_generator", np_generator, NP_GENERATORS)
        if np_generator == "mlp":
            check_choice("np_generator_act", "relu" if np_generator_act is None else np_generator_act,
                         NP_GENERATOR_ACTS)
        elif np_generator_act is not None:
            raise ValueError(f"`np_generator_act` only applies to np_generator='mlp', got {np_generator_act!r} "
                             f"with np_generator={np_generator!r}.")
        check_bool("np_shared_bottleneck", np_shared_bottleneck)
        check_choice("np_init", np_init, NP_INITS)
        check_positive("np_init_scale", np_init_scale, integer=False)
        check_positive("np_alpha", np_alpha, allow_zero=True, integer=False)
        check_bool("np_fp32_modulation", np_fp32_modulation)
        check_bool("np_variational", np_variational)
        num_layers = num_hidden_layers
        check_positive("num_hidden_layers", num_layers)
        self.npt_layers = resolve_npt_layers(npt_layers, num_layers)
        if npt_enabled_layers is not None:
            enabled = resolve_npt_layers(list(npt_enabled_layers), num_layers)
            stray = sorted(set(enabled) - set(self.npt_layers))
            if stray:
                raise ValueError(f"`npt_enabled_layers` {stray} are not NPT layers (`npt_layers`={self.npt_layers}).")
            npt_enabled_layers = enabled
        self.np_rank = np_rank
        self.np_num_ranks = np_num_ranks
        self.np_modulation = np_modulation
        self.np_residual_mode = np_residual_mode
        self.np_mlp_input = np_mlp_input
        self.np_generator = np_generator
        self.np_generator_act = np_generator_act
        self.np_shared_bottleneck = np_shared_bottleneck
        self.np_init = np_init
        self.np_init_scale = float(np_init_scale)
        self.np_alpha = float(np_alpha)
        self.np_fp32_modulation = np_fp32_modulation
        self.np_variational = np_variational
        self.npt_enabled_layers = npt_enabled_layers
        super().__init__(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, hidden_act=hidden_act,
            max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
            rms_norm_eps=rms_norm_eps, use_cache=use_cache, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, pretraining_tp=pretraining_tp, tie_word_embeddings=tie_word_embeddings,
            rope_parameters=rope_parameters, attention_bias=attention_bias, attention_dropout=attention_dropout,
            mlp_bias=mlp_bias, head_dim=head_dim, **kwargs,
        )
        self.validate()  # `@strict` runs LlamaConfig's class validators for LlamaConfig itself, not for subclasses

    @property
    def np_projections(self) -> tuple[str, ...]:
        """The modulated MLP projections, e.g. `("gate", "up")`."""
        return NP_MODULATIONS[self.np_modulation]

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, **npt_fields: Any) -> NPTConfig:
        """The NPT config of a base Llama: every base field copied, the NPT fields from `npt_fields`.

        Raises:
            ValueError: `config` is not a Llama config, or an NPT field is invalid.
        """
        if not isinstance(config, LlamaConfig) or config.model_type not in ("llama", cls.model_type):
            raise ValueError(
                f"NPT converts Llama checkpoints only; got a config of model_type "
                f"'{getattr(config, 'model_type', type(config).__name__)}'."
            )
        fields = {key: value for key, value in config.to_dict().items() if key not in _BASE_ONLY_KEYS}
        if isinstance(config, NPTConfig):
            fields = {key: value for key, value in fields.items() if not key.startswith(("np_", "npt_"))}
        unknown = sorted(key for key in npt_fields if not key.startswith(("np_", "npt_")))
        if unknown:
            raise ValueError(f"unknown NPT field(s) {unknown}: NPT fields start with 'np_' or 'npt_'.")
        return cls(**fields, **npt_fields)

    def to_llama_config(self) -> LlamaConfig:
        """The base `LlamaConfig` (the NPT fields dropped)."""
        fields = {key: value for key, value in self.to_dict().items()
                  if key not in _BASE_ONLY_KEYS and not key.startswith(("np_", "npt_"))}
        return LlamaConfig(**fields)


__all__ = ["NPTConfig", "resolve_npt_layers"]
