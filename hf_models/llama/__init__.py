"""The zoo's baseline: transformers' own `LlamaForCausalLM`, registered so that every tool treats it like the
zoo's architectures (the CLI trains it, the benchmarks compare every architecture with a same-size Llama)."""

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from ..registry import ArchitectureSpec, register

SPEC = register(
    ArchitectureSpec(
        model_type="llama",
        config_class=LlamaConfig,
        model_class=LlamaForCausalLM,
        base_model_class=LlamaModel,
        task="causal-lm",
        description="Hugging Face Llama (RoPE, RMSNorm, SwiGLU, GQA): the zoo's baseline.",
        default_config=dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        tiny_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        invalid_configs=(({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),),
        lora_target_modules=("q_proj", "v_proj"),
    )
)

__all__: list[str] = []
