"""Masked diffusion LM (seed 002): a bidirectional transformer trained to un-mask text (absorbing-state diffusion),
with an optional sampler head for locally coherent wavefront sampling and an optional critic head for remasking;
`diffusion_generate` samples text."""


from ..registry import ArchitectureSpec, default_sizes, register, tiny_sizes
from .configuration_masked_diffusion import MaskedDiffusionConfig
from .modeling_masked_diffusion import (
    DiffusionGenerateOutput,
    MaskedDiffusionForMaskedLM,
    MaskedDiffusionLMOutput,
    MaskedDiffusionModel,
    MaskedDiffusionPreTrainedModel,
)


SPEC = register(
    ArchitectureSpec(
        config_class=MaskedDiffusionConfig,
        model_class=MaskedDiffusionForMaskedLM,
        base_model_class=MaskedDiffusionModel,
        task="masked-lm",
        description="Masked diffusion LM: a bidirectional transformer trained to un-mask text (absorbing-state "
                    "diffusion, ELBO-weighted), sampled by iterative un-masking, with a sampler head for locally "
                    "coherent wavefront filling and a critic head for remasking (seed 002).",
        trainer="training.diffusion:DiffusionTrainer",
        default_config=default_sizes(
            num_attention_heads=4,
            mask_token_id=2,  # the zoo BPE's <mask>; the training CLI sets the tokenizer's own
            add_sampler_head=True,
            add_critic_head=True,
        ),
        tiny_config=tiny_sizes(
            intermediate_size=64,
            num_attention_heads=4,
            mask_token_id=2,
            add_sampler_head=True,
            add_critic_head=True,
        ),
        invalid_configs=(
            ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
            ({"hidden_size": -8}, "hidden_size"),
            ({"num_hidden_layers": 0}, "num_hidden_layers"),
            ({"max_position_embeddings": 0}, "max_position_embeddings"),
            ({"attention_type": "sliding"}, "attention_type"),
            ({"mask_token_id": 64}, "mask_token_id"),
            ({"mask_token_id": None}, "mask_token_id"),
            ({"attention_type": "causal"}, "attention_type"),
            ({"sampler_min_neighbors_ratio": 0.0}, "sampler_min_neighbors_ratio"),
            ({"sampler_min_neighbors_ratio": 1.5}, "sampler_min_neighbors_ratio"),
            ({"start_sampler_step": -1}, "start_sampler_step"),
            ({"start_critic_step": 10, "end_critic_step": 5}, "end_critic_step"),
            ({"critic_alpha": -0.5}, "critic_alpha"),
            ({"add_sampler_head": 1}, "add_sampler_head"),
            ({"tie_word_embeddings": 0.0}, "tie_word_embeddings"),
        ),
        benchmark_modes={
            "naive": {"sampler": "naive"},
            "wavefront": {"sampler": "wavefront"},
            "wavefront+critic": {"sampler": "wavefront", "use_critic": True},
        },
        generate_method="diffusion_generate",
        supports_cache=False,
        auxiliary_parameters=("sampler_head.", "critic_head."),
        sample_kwargs={"sampler": "auto", "temperature": 0.8, "top_p": 0.95},
        eval_loss_is_bound=True,
        seed_experiment="sampler_coherence",
        card_tags=("masked-diffusion", "discrete-diffusion", "non-autoregressive", "fill-mask"),
    )
)

__all__ = [
    "DiffusionGenerateOutput",
    "MaskedDiffusionConfig",
    "MaskedDiffusionForMaskedLM",
    "MaskedDiffusionLMOutput",
    "MaskedDiffusionModel",
    "MaskedDiffusionPreTrainedModel",
]
