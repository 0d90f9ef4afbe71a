"""Nanohead GPT (seed 003): a nanochat-style GPT whose attention mixes normal heads with tiny nanoheads."""

from transformers import LlamaConfig, PreTrainedConfig

from ..registry import ArchitectureSpec, default_sizes, register, same_size_llama_config, tiny_sizes
from .configuration_nanohead import NanoheadConfig, NanoheadSplit, calculate_nanohead_split
from .modeling_nanohead import NanoheadForCausalLM, NanoheadModel, NanoheadPreTrainedModel


def parameter_matched_llama_config(config: PreTrainedConfig) -> LlamaConfig:
    """The same-size Llama baseline: same width, depth, heads, vocabulary and context, untied head, and a SwiGLU
    width of 2/3 of the ReLU² MLP width, so that its MLP (three matrices) has as many parameters as this one's
    (two)."""
    baseline = same_size_llama_config(config)
    baseline.intermediate_size = max(1, round(2 * config.intermediate_size / 3))
    baseline.tie_word_embeddings = config.tie_word_embeddings
    baseline.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    return baseline


SPEC = register(
    ArchitectureSpec(
        config_class=NanoheadConfig,
        model_class=NanoheadForCausalLM,
        base_model_class=NanoheadModel,
        task="causal-lm",
        description="Nanohead GPT: nanochat GPT (QK-norm, ReLU², soft-capped logits) whose attention mixes rotary "
                    "GQA heads with tiny position-free nanoheads (seed 003).",
        default_config=default_sizes(
            num_attention_heads=4,
            nanohead_proportion=0.2,
            nanohead_dim=3,
        ),
        tiny_config=tiny_sizes(
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            nanohead_proportion=0.4,
            nanohead_dim=3,
        ),
        invalid_configs=(
            ({"nanohead_proportion": 1.0}, "nanohead_proportion"),
            ({"nanohead_proportion": -0.1}, "nanohead_proportion"),
            ({"nanohead_dim": 0}, "nanohead_dim"),
            ({"num_key_value_heads": 3}, "num_key_value_heads"),
            ({"hidden_size": 50, "nanohead_dim": 4}, "hidden_size"),
            ({"nanohead_proportion": 0.0, "hidden_size": 44}, "hidden_size"),
            ({"hidden_size": 0}, "hidden_size"),
            ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
            ({"learnable_logit_scale": 1}, "learnable_logit_scale"),
        ),
        lora_target_modules=("qkv_proj", "o_proj"),
        baseline_config=parameter_matched_llama_config,
        seed_experiment="nanohead_sweep",
        card_tags=("nanohead", "nanochat", "gqa", "qk-norm"),
    )
)

__all__ = [
    "NanoheadConfig",
    "NanoheadForCausalLM",
    "NanoheadModel",
    "NanoheadPreTrainedModel",
    "NanoheadSplit",
    "calculate_nanohead_split",
]
