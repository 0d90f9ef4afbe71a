"""Configuration of the Nanohead GPT (seed 003), and the rule that splits the attention width between normal heads
and nanoheads.

A Nanohead GPT is a nanochat-style GPT whose attention mixes two kinds of heads: normal heads (rotary positions,
QK-norm, grouped-query attention) and *nanoheads*, many heads of a tiny dimension (2-5) that take QK-norm but no
rotary positions. `nanohead_proportion` is the share of the attention's query/key/value parameters given to
nanoheads; `calculate_nanohead_split` turns it into head counts and dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..configuration_zoo_common import ZooConfig, check_bool, check_choice, check_interval, check_positive


@dataclass(frozen=True)
class NanoheadSplit:
    """How one attention layer's width is shared between the two kinds of heads.

    Both kinds keep the same grouped-query ratio `num_heads / num_kv_heads`, so the share of the query/key/value
    parameters that goes to nanoheads equals their share of the concatenated output width (`proportion`).

    Attributes:
        num_heads: normal (rotary) query heads.
        num_kv_heads: normal key/value heads.
        head_dim: dimension of a normal head (even: rotary embeddings rotate pairs of channels).
        num_nanoheads: nanohead query heads (0 for a plain GPT).
        num_nano_kv_heads: nanohead key/value heads.
        nanohead_dim: dimension of a nanohead.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_nanoheads: int
    num_nano_kv_heads: int
    nanohead_dim: int

    @property
    def normal_width(self) -> int:
        """Output width of the normal heads (`num_heads * head_dim`)."""
        return self.num_heads * self.head_dim

    @property
    def nano_width(self) -> int:
        """Output width of the nanoheads (`num_nanoheads * nanohead_dim`)."""
        return self.num_nanoheads * self.nanohead_dim

    @property
    def width(self) -> int:
        """Concatenated output width of both kinds (the hidden size)."""
        return self.normal_width + self.nano_width

    @property
    def proportion(self) -> float:
        """The share of the attention's query/key/value parameters (and output width) the nanoheads actually got."""
        return self.nano_width / self.width

    @property
    def kv_width(self) -> int:
        """Channels of keys (and of values) one token stores in the cache, both kinds together."""
        return self.num_kv_heads * self.head_dim + self.num_nano_kv_heads * self.nanohead_dim


def calculate_nanohead_split(
    hidden_size: int, num_heads: int, num_kv_heads: int, proportion: float, nanohead_dim: int
) -> NanoheadSplit:
    """Share `hidden_size` attention channels between `num_heads` normal heads and nanoheads of `nanohead_dim`.

    The number of normal heads and the grouped-query ratio `g = num_heads / num_kv_heads` are kept; the normal head
    dimension `d` (even, for the rotary embedding) and the number of nanoheads `m` (a multiple of `g`, so that
    nanoheads keep the same ratio) are chosen so that `num_heads * d + m * nanohead_dim == hidden_size` exactly.

    Rounding: among all allocations that satisfy these constraints, the one whose nanohead width `m * nanohead_dim`
    is nearest to the requested `proportion * hidden_size` wins; a tie goes to the smaller nanohead width. With
    `proportion > 0` at least one group of nanoheads is required, so a positive proportion never silently yields a
    plain GPT; `proportion == 0` gives the plain GPT (`d = hidden_size / num_heads`, no nanoheads). The result's
    `proportion` reports what was achieved.

    Example: `calculate_nanohead_split(512, 4, 4, 0.2, 3)` asks for about 102 nanohead channels; 102 (34 heads)
    would leave 410 channels, which 4 heads cannot share with an even dimension, so the split returns 4 normal
    heads of dimension 104 and 32 nanoheads (96 channels, proportion 0.1875).

    Raises:
        ValueError: an argument is out of range, `num_kv_heads` does not divide `num_heads`, or no allocation
            satisfies the constraints.
    """
    check_positive("hidden_size", hidden_size)
    check_positive("num_attention_heads", num_heads)
    check_positive("num_key_value_heads", num_kv_heads)
    check_interval("nanohead_proportion", proportion, 0.0, 1.0)
    check_positive("nanohead_dim", nanohead_dim)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"`num_key_value_heads` ({num_kv_heads}) must divide `num_attention_heads` ({num_heads})."
        )
    groups = num_heads // num_kv_heads
    if proportion == 0:
        head_dim, remainder = divmod(hidden_size, num_heads)
        if remainder or head_dim % 2:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be {num_heads} (`num_attention_heads`) times an even head "
                f"dimension (rotary embeddings rotate channel pairs)."
            )
        return NanoheadSplit(num_heads, num_kv_heads, head_dim, 0, 0, nanohead_dim)

    target = proportion * hidden_size
    best: tuple[float, int, int] | None = None
    for head_dim in range(2, hidden_size // num_heads + 1, 2):
        nano_width = hidden_size - num_heads * head_dim
        if nano_width <= 0 or nano_width % (nanohead_dim * groups):
            continue
        key = (abs(nano_width - target), nano_width, head_dim)
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError(
            f"no split of `hidden_size`={hidden_size} into {num_heads} normal heads (`num_attention_heads`, even "
            f"head dim) and nanoheads of `nanohead_dim`={nanohead_dim} in groups of {groups} (the GQA ratio "
            f"`num_attention_heads`/`num_key_value_heads`) exists for `nanohead_proportion`={proportion}: the "
            f"nanohead width hidden_size - {num_heads}*head_dim must be a positive multiple of "
            f"{nanohead_dim * groups}."
        )
    _, nano_width, head_dim = best
    num_nanoheads = nano_width // nanohead_dim
    return NanoheadSplit(num_heads, num_kv_heads, head_dim, num_nanoheads, num_nanoheads // groups, nanohead_dim)


class NanoheadConfig(ZooConfig):
    r"""Configuration of a [`NanoheadModel`] / [`NanoheadForCausalLM`]: a nanochat-style GPT (untied embeddings,
    parameter-free RMSNorm, rotary positions, QK-norm, GQA, ReLU² MLP, logit soft-capping) whose attention mixes
    normal heads with nanoheads.

    Args:
        vocab_size (`int`, *optional*, defaults to 32768): vocabulary size.
        hidden_size (`int`, *optional*, defaults to 768): width of the residual stream; also the concatenated
            output width of all attention heads.
        intermediate_size (`int`, *optional*): width of the ReLU² MLP (default `4 * hidden_size`).
        num_hidden_layers (`int`, *optional*, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 6): number of normal (rotary) query heads; nanoheads
            come in addition, see `nanohead_proportion`.
        num_key_value_heads (`int`, *optional*): normal key/value heads (default `num_attention_heads`); must divide
            `num_attention_heads`. Nanoheads keep the same query-per-key/value ratio.
        nanohead_proportion (`float`, *optional*, defaults to 0.0): share of the attention's query/key/value
            parameters given to nanoheads, in [0, 1); 0 is a plain GPT. The split is rounded to the nearest valid
            allocation, see `calculate_nanohead_split` (the achieved share is `config.nanohead_split.proportion`).
        nanohead_dim (`int`, *optional*, defaults to 3): dimension of a nanohead (meant to be 2-5).
        learnable_logit_scale (`bool`, *optional*, defaults to `False`): give every query head (normal and nano) a
            learnable logit scale `exp(s_h)` (`s_h` starts at 0) that multiplies its QK-normed query, like the
            QK-norm gain of recent GPTs. Off (the seed, faithful): QK-norm fixes `|q| = |k| = sqrt(d)`, so with the
            `1/sqrt(d)` scale no attention logit exceeds `sqrt(d)` (1.73 for a 3-dim nanohead), which caps how
            sharply a small head can attend. Keys (and so the cache) are unchanged.
        max_position_embeddings (`int`, *optional*, defaults to 2048): longest sequence the model is meant for.
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the rotary embedding of the normal heads.
        hidden_act (`str`, *optional*, defaults to `"relu2"`): MLP activation (nanochat uses ReLU²).
        rms_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the parameter-free RMSNorms.
        final_logit_softcapping (`float`, *optional*, defaults to 15.0): logits become `c * tanh(logits / c)`;
            `None` disables the cap.
        loss_chunk_size (`int`, *optional*): in training with `labels`, compute the LM head, the soft-cap and the
            cross-entropy together, this many positions at a time (`hf_models.fused_cross_entropy`), without the
            `(batch, seq, vocab)` logits: the same loss and gradients up to float rounding, faster and smaller on
            large vocabularies (128 was the fastest on a CPU core at 32,768 tokens, see the model card); the
            output's `logits` are then `None`. `None` (default): the plain path. Evaluation and generation always
            return logits.
        initializer_range (`float`, *optional*, defaults to 0.02): standard deviation of the initialisation of the
            blocks' output projections (`o_proj`, `down_proj`; nanochat zeroes them); embeddings start with std 1,
            every other matrix with std `1/sqrt(fan_in)`.
        use_cache (`bool`, *optional*, defaults to `True`): whether the model returns its key/value cache.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie the LM head to the token embedding.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.
    """

    model_type = "nanohead_gpt"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        nanohead_proportion: float = 0.0,
        nanohead_dim: int = 3,
        learnable_logit_scale: bool = False,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        hidden_act: str = "relu2",
        rms_norm_eps: float = 1e-6,
        final_logit_softcapping: float | None = 15.0,
        loss_chunk_size: int | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if intermediate_size is None and isinstance(hidden_size, int):
            intermediate_size = 4 * hidden_size
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        for name, value in (("vocab_size", vocab_size), ("intermediate_size", intermediate_size),
                            ("num_hidden_layers", num_hidden_layers),
                            ("max_position_embeddings", max_position_embeddings)):
            check_positive(name, value)
        check_positive("rope_theta", rope_theta, integer=False)
        check_positive("rms_norm_eps", rms_norm_eps, integer=False)
        check_positive("initializer_range", initializer_range, allow_zero=True, integer=False)
        if final_logit_softcapping is not None:
            check_positive("final_logit_softcapping", final_logit_softcapping, integer=False)
        if loss_chunk_size is not None:
            check_positive("loss_chunk_size", loss_chunk_size)
        check_bool("learnable_logit_scale", learnable_logit_scale)
        check_choice("hidden_act", hidden_act, ("relu2", "relu", "gelu", "silu"))
        calculate_nanohead_split(hidden_size, num_attention_heads, num_key_value_heads, nanohead_proportion,
                                 nanohead_dim)  # raises a ValueError naming the field when no split exists

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.nanohead_proportion = nanohead_proportion
        self.nanohead_dim = nanohead_dim
        self.learnable_logit_scale = learnable_logit_scale
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.final_logit_softcapping = final_logit_softcapping
        self.loss_chunk_size = loss_chunk_size
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def nanohead_split(self) -> NanoheadSplit:
        """The head counts and dimensions of both kinds of heads (see `calculate_nanohead_split`)."""
        return calculate_nanohead_split(self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                                        self.nanohead_proportion, self.nanohead_dim)
