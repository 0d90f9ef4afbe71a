"""Neuro-Plastic Transformer on Llama (seed 004): a `LlamaForCausalLM` whose chosen layers turn their attention
output into per-token low-rank updates of the MLP weights, distilled from the base Llama by `training.npt`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig, PreTrainedModel

from ..llama import SPEC as LLAMA_SPEC
from ..registry import ArchitectureSpec, register
from .configuration_npt import NPTConfig, resolve_npt_layers
from .modeling_npt import (
    NPModulator,
    NPTCausalLMOutputWithPast,
    NPTDecoderLayer,
    NPTForCausalLM,
    NPTLayerRecord,
    NPTModel,
    NPTPreTrainedModel,
    NPTProjectionRecord,
)


def load_npt_or_convert_llama(path: str, overrides: Mapping[str, Any], trust_remote_code: bool) -> PreTrainedModel:
    """The training CLI's `--model_name_or_path` for NPT: an NPT checkpoint loads as is (config `overrides`
    applied); a base Llama checkpoint is converted with `NPTForCausalLM.from_llama(path, **overrides)` (overrides
    are then NPT fields such as `npt_layers=[2]`).

    Raises:
        ValueError: the checkpoint is neither, or an override is invalid.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type == "llama":
        return NPTForCausalLM.from_llama(path, **overrides)
    if config.model_type != NPTConfig.model_type:
        raise ValueError(f"NPT converts Llama checkpoints only; '{path}' is a '{config.model_type}'.")
    fields = config.to_dict()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for model_type '{NPTConfig.model_type}'")
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        fields.pop(key, None)
    return NPTForCausalLM.from_pretrained(path, config=NPTConfig(**{**fields, **overrides}))


SPEC = register(
    ArchitectureSpec(
        config_class=NPTConfig,
        model_class=NPTForCausalLM,
        base_model_class=NPTModel,
        task="causal-lm",
        trainer="training.npt:NPTTrainer",
        description="Neuro-Plastic Transformer: a Llama whose chosen layers turn attention into per-token rank-k "
                    "MLP weight updates, distilled layer-wise from the base Llama (seed 004).",
        # the sizes of the Llama it converts
        default_config=dict(LLAMA_SPEC.default_config, np_rank=64),
        tiny_config=dict(
            LLAMA_SPEC.tiny_config,
            # A fresh random model is the battery's teacher: with Llama's 0.02 init its attention output is small
            # and the linear generator's modulation, quadratic (even) in it, barely moves in 30 steps; wider
            # weights, the kept attention residual and the affine generator (a term linear in `a`) let the
            # distillation make visible progress.
            initializer_range=0.2,
            npt_layers=[1],
            np_rank=16,
            np_modulation="gate_up",
            np_residual_mode="keep",
            np_generator="affine",
        ),
        invalid_configs=(
            ({"npt_layers": [2]}, "npt_layers"),
            ({"npt_layers": "middle"}, "npt_layers"),
            ({"np_rank": 0}, "np_rank"),
            ({"np_num_ranks": 0}, "np_num_ranks"),
            ({"np_modulation": "down"}, "np_modulation"),
            ({"np_residual_mode": "add"}, "np_residual_mode"),
            ({"np_mlp_input": "attn"}, "np_mlp_input"),
            ({"np_generator": "conv"}, "np_generator"),
            ({"np_generator_act": "relu"}, "np_generator_act"),
            ({"np_init": "identity"}, "np_init"),
            ({"np_init_scale": 0.0}, "np_init_scale"),
            ({"np_alpha": -1.0}, "np_alpha"),
            ({"npt_enabled_layers": [0]}, "npt_enabled_layers"),
            ({"hidden_size": 30}, "hidden_size"),
            ({"np_shared_bottleneck": 1}, "np_shared_bottleneck"),
            ({"np_fp32_modulation": 0.0}, "np_fp32_modulation"),
        ),
        lora_target_modules=("q_proj", "v_proj"),
        pretrained_loader=load_npt_or_convert_llama,
        base_model_required="NPT converts a pretrained Llama: pass --model_name_or_path with a Llama folder or Hub id "
                            "(e.g. the output of `python -m training.train --model_type llama ...`), or an NPT "
                            "checkpoint to continue",
        seed_experiment="benchmarks.npt_losses",
        card_tags=("npt", "llama", "distillation"),
    )
)

__all__ = [
    "NPModulator",
    "NPTCausalLMOutputWithPast",
    "NPTConfig",
    "NPTDecoderLayer",
    "NPTForCausalLM",
    "NPTLayerRecord",
    "NPTModel",
    "NPTPreTrainedModel",
    "NPTProjectionRecord",
    "resolve_npt_layers",
]
