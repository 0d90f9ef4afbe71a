"""Bicameral FFT byte LM with a dual head (seed 000): a byte model mixing positions with a causal FFT long
convolution and a short convolution, with an optional teacher-token head trained by `training.dual_head`."""

from transformers import LlamaConfig, PreTrainedConfig

from ..registry import ArchitectureSpec, default_sizes, register, same_size_llama_config, tiny_sizes
from .configuration_bicameral import BicameralConfig
from .modeling_bicameral import (
    BicameralCache,
    BicameralCausalLMOutput,
    BicameralForCausalLM,
    BicameralModel,
    BicameralPreTrainedModel,
)


def parameter_matched_llama_config(config: PreTrainedConfig) -> LlamaConfig:
    """The same-size Llama baseline on bytes: same width, depth, vocabulary and context, heads of 64 channels, and a
    SwiGLU width of `4/3 * ffn_mult/2 * hidden` so that its MLP (three matrices) has the parameters of this
    model's two-matrix FFN."""
    baseline = same_size_llama_config(config)
    baseline.intermediate_size = max(1, round(2 * config.ffn_mult * config.hidden_size / 3))
    return baseline


SPEC = register(
    ArchitectureSpec(
        config_class=BicameralConfig,
        model_class=BicameralForCausalLM,
        base_model_class=BicameralModel,
        task="causal-lm",
        tokenizer="byte",
        trainer="training.dual_head:DualHeadTrainer",
        description="Bicameral FFT byte LM: causal FFT long convolution + short convolution per block, with a "
                    "teacher-BPE token head trained beside the byte head (seed 000).",
        default_config=default_sizes(
            kernel_len=128,
            cutoff=128,
            token_vocab_size=2048,
        ),
        tiny_config=tiny_sizes(
            vocab_size=259,
            kernel_len=8,
            transition_bins=4,
            token_vocab_size=300,
            dropout=0.0,
        ),
        invalid_configs=(
            ({"hidden_size": 0}, "hidden_size"),
            ({"kernel_len": 0}, "kernel_len"),
            ({"kernel_len": 65}, "kernel_len"),
            ({"time_kernel_size": 0}, "time_kernel_size"),
            ({"cutoff": 0}, "cutoff"),
            ({"cutoff": 100}, "cutoff"),
            ({"chunk_size": 64}, "chunk_size"),
            ({"token_vocab_size": -1}, "token_vocab_size"),
            ({"token_loss_weight": -0.5}, "token_loss_weight"),
            ({"context_pooling": "mean"}, "context_pooling"),
            ({"spectral_gating": "both"}, "spectral_gating"),
            ({"phase_activation": True}, "phase_activation"),
            ({"dropout": 1.0}, "dropout"),
            ({"phase_activation": 0.0}, "phase_activation"),
        ),
        lora_target_modules=("ffn_up", "ffn_down"),
        auxiliary_parameters=("token_head",),
        baseline_config=parameter_matched_llama_config,
        seed_experiment="dual_head",
        card_tags=("byte-level", "fft", "long-convolution", "dual-head"),
        not_applicable={"attentions": "attention-free: bytes are mixed by FFT long convolutions and short "
                                      "convolutions, so there are no attention weights"},
    )
)

__all__ = [
    "BicameralCache",
    "BicameralCausalLMOutput",
    "BicameralConfig",
    "BicameralForCausalLM",
    "BicameralModel",
    "BicameralPreTrainedModel",
]
