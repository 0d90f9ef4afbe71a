"""Multi-head Toeplitz mixer LM (seed 001, "Experiment 010"): attention-free blocks whose token mixing is a learned
causal convolution per head, with exact O(t)-per-token cached decoding."""


from ..registry import ArchitectureSpec, default_sizes, register, tiny_sizes
from .configuration_toeplitz_mixer import ToeplitzMixerConfig
from .modeling_toeplitz_mixer import (
    ToeplitzMixerCache,
    ToeplitzMixerForCausalLM,
    ToeplitzMixerModel,
    ToeplitzMixerPreTrainedModel,
)


SPEC = register(
    ArchitectureSpec(
        config_class=ToeplitzMixerConfig,
        model_class=ToeplitzMixerForCausalLM,
        base_model_class=ToeplitzMixerModel,
        task="causal-lm",
        description="Multi-head Toeplitz mixer: attention-free blocks mixing tokens with one learned causal kernel "
                    "per head (optional mean normaliser and projections), exact O(t) cached decoding (seed 001).",
        default_config=default_sizes(
            num_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
        ),
        tiny_config=tiny_sizes(
            num_heads=4,
            intermediate_size=64,
        ),
        invalid_configs=(
            ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
            ({"num_heads": 0}, "num_heads"),
            ({"hidden_size": -8}, "hidden_size"),
            ({"max_position_embeddings": 0}, "max_position_embeddings"),
            ({"intermediate_size": 0}, "intermediate_size"),
            ({"mixer_impl": "conv"}, "mixer_impl"),
            ({"kernel_param": "exp"}, "kernel_param"),
            ({"context_overflow": "wrap"}, "context_overflow"),
            ({"dropout": 1.5}, "dropout"),
            ({"toep_norm_eps": -1.0}, "toep_norm_eps"),
            ({"parallel_heads": "yes"}, "parallel_heads"),
            ({"decode_step": "jit"}, "decode_step"),
            ({"do_toep_mean": 1}, "do_toep_mean"),
        ),
        benchmark_modes={"parallel": {"parallel_heads": True}, "sequential": {"parallel_heads": False}},
        lora_target_modules=("fc1", "fc2"),
        seed_experiment="toeplitz_variants",
        card_tags=("toeplitz", "long-convolution", "attention-free", "token-mixer"),
        hard_context=True,
        not_applicable={"attentions": "attention-free: each head mixes the sequence with a learned causal kernel, "
                                      "so there are no attention weights"},
    )
)

__all__ = [
    "ToeplitzMixerCache",
    "ToeplitzMixerConfig",
    "ToeplitzMixerForCausalLM",
    "ToeplitzMixerModel",
    "ToeplitzMixerPreTrainedModel",
]
