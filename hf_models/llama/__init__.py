"""The zoo's baseline: transformers' own `LlamaForCausalLM`, registered so that every tool treats it like the
zoo's architectures (the CLI trains it, the benchmarks compare every architecture with a same-size Llama)."""

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from ..registry import ArchitectureSpec, default_sizes, register, tiny_sizes

SPEC = register(
    ArchitectureSpec(
        config_class=LlamaConfig,
        model_class=LlamaForCausalLM,
        base_model_class=LlamaModel,
        task="causal-lm",
        description="Hugging Face Llama (RoPE, RMSNorm, SwiGLU, GQA): the zoo's baseline.",
        default_config=default_sizes(
            intermediate_size=768,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        tiny_config=tiny_sizes(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        invalid_configs=(({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),),
        lora_target_modules=("q_proj", "v_proj"),
    )
)

__all__: list[str] = []
