"""Configuration of the masked diffusion language model (seed 002) with its optional sampler and critic heads."""

from __future__ import annotations

from typing import Any

from ..configuration_zoo_common import ZooConfig, check_bool, check_choice, check_interval, check_positive

ATTENTION_TYPES = ("bidirectional", "causal")


class MaskedDiffusionConfig(ZooConfig):
    r"""Configuration of a [`MaskedDiffusionModel`] / [`MaskedDiffusionForMaskedLM`]: a pre-norm transformer trunk
    (rotary positions, RMSNorm, SwiGLU MLP) that reads a sequence in which some tokens are `[MASK]` and predicts
    the original token at every position (absorbing-state / masked discrete diffusion), plus two optional
    auxiliary heads used when sampling.

    Args:
        vocab_size (`int`, *optional*, defaults to 4096): vocabulary size, the mask token included.
        hidden_size (`int`, *optional*, defaults to 256): width of the residual stream `C`.
        intermediate_size (`int`, *optional*): width of the SwiGLU MLP (default `4 * hidden_size`).
        num_hidden_layers (`int`, *optional*, defaults to 4): number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 4): attention heads; must divide `hidden_size` into
            an even head dimension (rotary embeddings rotate channel pairs).
        max_position_embeddings (`int`, *optional*, defaults to 1024): the longest sequence (prompt + generated
            tokens) the model is meant for; `diffusion_generate` refuses longer ones.
        attention_type (`str`, *optional*, defaults to `"bidirectional"`): `"bidirectional"` (every position sees
            every other: the diffusion model) or `"causal"` (kept from the original fork for ablations; the
            sampler head requires bidirectional attention).
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the rotary position embedding.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the RMSNorms.
        initializer_range (`float`, *optional*, defaults to 0.02): standard deviation of the weight initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): tie the LM head to the token embedding (as the
            original nanoGPT trunk does).
        mask_token_id (`int`, *optional*): id of the `[MASK]` token. Required to build a model (the config alone
            may omit it, e.g. `AutoConfig.for_model`); must lie in `[0, vocab_size)`.
        add_sampler_head (`bool`, *optional*, defaults to `False`): add the sampler head, a two-layer MLP on
            `[E(left neighbour), h, E(right neighbour)]` with its own vocabulary projection, used by wavefront
            sampling. Requires bidirectional attention and a `mask_token_id`.
        start_sampler_step (`int`, *optional*, defaults to 0): optimizer step from which the training objective
            adds the sampler loss.
        sampler_min_neighbors_ratio (`float`, *optional*, defaults to 0.01): bootstrap share: when no masked
            position has a filled neighbour, wavefront sampling first fills this share of the masked positions
            (at least one) by confidence with naive sampling. In `(0, 1]`.
        add_critic_head (`bool`, *optional*, defaults to `False`): add the critic head, `Linear(C -> 1)` on the
            trunk's hidden states, predicting whether the token at a position is wrong; used by critic-guided
            remasking.
        start_critic_step (`int`, *optional*, defaults to 0): optimizer step from which the objective adds the
            critic loss.
        end_critic_step (`int`, *optional*): step at which the critic loss weight reaches `critic_alpha`, rising
            linearly from `start_critic_step` (see `critic_weight`); `None`: full weight at once.
        critic_alpha (`float`, *optional*, defaults to 0.5): full weight of the critic loss.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.
    """

    model_type = "masked_diffusion_lm"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        max_position_embeddings: int = 1024,
        attention_type: str = "bidirectional",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        mask_token_id: int | None = None,
        add_sampler_head: bool = False,
        start_sampler_step: int = 0,
        sampler_min_neighbors_ratio: float = 0.01,
        add_critic_head: bool = False,
        start_critic_step: int = 0,
        end_critic_step: int | None = None,
        critic_alpha: float = 0.5,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if intermediate_size is None and isinstance(hidden_size, int):
            intermediate_size = 4 * hidden_size
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads),
                            ("max_position_embeddings", max_position_embeddings)):
            check_positive(name, value)
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be `num_attention_heads` ({num_attention_heads}) times an even "
                "head dimension (rotary embeddings rotate channel pairs)."
            )
        check_choice("attention_type", attention_type, ATTENTION_TYPES)
        check_positive("rope_theta", rope_theta, integer=False)
        check_positive("rms_norm_eps", rms_norm_eps, integer=False)
        check_positive("initializer_range", initializer_range, allow_zero=True, integer=False)
        check_bool("tie_word_embeddings", tie_word_embeddings)
        if mask_token_id is not None:
            check_positive("mask_token_id", mask_token_id, allow_zero=True)
            if mask_token_id >= vocab_size:
                raise ValueError(f"`mask_token_id` ({mask_token_id}) must be smaller than `vocab_size` ({vocab_size}).")
        check_bool("add_sampler_head", add_sampler_head)
        check_bool("add_critic_head", add_critic_head)
        if add_sampler_head and attention_type != "bidirectional":
            raise ValueError("`add_sampler_head` requires `attention_type='bidirectional'`: the sampler conditions on "
                             f"the right neighbour too (got attention_type={attention_type!r}).")
        if add_sampler_head and mask_token_id is None:
            raise ValueError("`add_sampler_head` requires a `mask_token_id`: masked neighbours must be recognised.")
        check_positive("start_sampler_step", start_sampler_step, allow_zero=True)
        check_interval("sampler_min_neighbors_ratio", sampler_min_neighbors_ratio, 0.0, 1.0, closed_high=True)
        if sampler_min_neighbors_ratio == 0:
            raise ValueError("`sampler_min_neighbors_ratio` must be > 0: the bootstrap must fill at least a share.")
        check_positive("start_critic_step", start_critic_step, allow_zero=True)
        if end_critic_step is not None:
            check_positive("end_critic_step", end_critic_step, allow_zero=True)
        if end_critic_step is not None and end_critic_step < start_critic_step:
            raise ValueError(f"`end_critic_step` ({end_critic_step}) must be >= `start_critic_step` "
                             f"({start_critic_step}).")
        check_positive("critic_alpha", critic_alpha, allow_zero=True, integer=False)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.attention_type = attention_type
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.add_sampler_head = add_sampler_head
        self.start_sampler_step = start_sampler_step
        self.sampler_min_neighbors_ratio = sampler_min_neighbors_ratio
        self.add_critic_head = add_critic_head
        self.start_critic_step = start_critic_step
        self.end_critic_step = end_critic_step
        self.critic_alpha = critic_alpha
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    def critic_weight(self, step: int) -> float:
        """Weight of the critic loss at optimizer step `step` (counted from 0): 0 before `start_critic_step`, then
        rising linearly to `critic_alpha`, reached at `end_critic_step` (at once without a ramp)."""
        if not self.add_critic_head or step < self.start_critic_step:
            return 0.0
        end = self.start_critic_step if self.end_critic_step is None else self.end_critic_step
        ramp = end - self.start_critic_step
        return float(self.critic_alpha) * min(1.0, (step - self.start_critic_step + 1) / (ramp + 1))


__all__ = ["MaskedDiffusionConfig"]
