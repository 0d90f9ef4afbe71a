"""The zoo's registry: one `ArchitectureSpec` per architecture, the single place the CLI, the benchmarks and the
common test battery look an architecture up.

An architecture registers itself from its sub-package's `__init__` (`register(ArchitectureSpec(...))`), after
registering its classes with the `Auto*` factories. `hf_models/__init__.py` imports every sub-package, so
`import hf_models` fills the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

Task = Literal["causal-lm", "masked-lm"]
AUTO_FACTORY_FOR_TASK = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM}


def same_size_llama_config(config: PreTrainedConfig) -> LlamaConfig:
    """A `LlamaConfig` of the same width, depth, MLP width, vocabulary and context as `config`.

    This is the baseline every benchmark of the zoo measures beside the architecture. Fields are read by their
    Hugging Face names; an architecture whose config differs provides its own `baseline_config`.
    """
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None) or max(1, hidden // 64)
    if hidden % heads:
        heads = 1
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * hidden,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )


TINY_SIZES: Mapping[str, int] = {
    "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 64,
}
DEFAULT_SIZES: Mapping[str, int] = {"hidden_size": 256, "num_hidden_layers": 4, "max_position_embeddings": 1024}


def tiny_sizes(**fields: Any) -> dict[str, Any]:
    """A spec's `tiny_config`: the zoo's tiny test sizes (`TINY_SIZES`, Hugging Face field names) updated with the
    architecture's own `fields`."""
    return {**TINY_SIZES, **fields}


def default_sizes(**fields: Any) -> dict[str, Any]:
    """A spec's `default_config`: the zoo's CPU-trainable sizes (`DEFAULT_SIZES`) updated with the architecture's own
    `fields`."""
    return {**DEFAULT_SIZES, **fields}


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the zoo's tools need to know about one architecture.

    Attributes:
        config_class: the configuration class.
        model_class: the model trained, generated from and pushed (`...ForCausalLM` / `...ForMaskedLM`).
        task: `"causal-lm"` (next-token, `generate`) or `"masked-lm"` (bidirectional, own sampler).
        description: one line for tables, cards and `--help`.
        model_type: the CLI's `--model_type`; by default (and normally) the config class's `model_type`.
        base_model_class: the headless `...Model`, if any.
        tokenizer: `"bpe"` (a BPE tokenizer trained on the corpus or `--tokenizer_name`) or `"byte"`.
        trainer: `"module:Class"` of the `Trainer` subclass that implements the objective (resolved lazily, so
            the library never imports `training`).
        default_config: config fields the CLI starts from before `--config_overrides` (a small model that trains
            on a CPU, usually built by `default_sizes`); anything not listed keeps the config class's default.
        tiny_config: config fields of a tiny model for the test battery (usually built by `tiny_sizes`: vocabulary
            64 unless stated).
        invalid_configs: `(overrides, field)` pairs that the config must reject with a `ValueError` naming `field`.
        benchmark_modes: named keyword sets passed to the generation method (e.g. head schedules); the
            benchmark times each.
        generate_method: the model method that generates (`generate`, or e.g. `diffusion_generate`).
        supports_cache: whether generation has a cached path to compare with the uncached one.
        lora_target_modules: module names PEFT's LoRA adapts in the test battery (`None`: not applicable).
        auxiliary_parameters: name prefixes of parameters that the plain language-model loss does not reach
            (auxiliary heads trained by the architecture's own objective and tested by its own tests).
        baseline_config: maps a config to the same-size Llama baseline's config.
        sample_kwargs: keyword arguments of the generation method for the CLI's text sample.
        eval_loss_is_bound: the evaluation loss is an upper bound on the negative log-likelihood per token (e.g. a
            masked diffusion ELBO), not the likelihood itself; the training CLI then reports perplexity and bits per
            byte as bounds (`eval_perplexity_bound`, `eval_bits_per_byte_bound`, `eval_bits_per_token_bound`).
        pretrained_loader: `(path, overrides, trust_remote_code) -> model` used for `--model_name_or_path`
            instead of `model_class.from_pretrained` (e.g. to convert a base checkpoint into this architecture).
        seed_experiment: the `benchmarks.<module>` that reproduces the seed experiment, if any.
        card_tags: extra Hub tags for model cards.
        hard_context: the model cannot read more than `max_position_embeddings` tokens in one forward pass (e.g.
            kernels of that length); its saved tokenizer then says so in `model_max_length`.
        base_model_required: the architecture is a conversion of a pretrained base (e.g. NPT of a Llama): the
            training CLI refuses to start one from random weights and says this instead (it names the option,
            `--model_name_or_path`, and what the base may be).
        not_applicable: common-battery checks that cannot apply to this architecture, each with its reason in one
            line (as transformers' Mamba tests set `has_attentions = False`); known keys: `"attentions"` (the model
            has no attention weights: `output_attentions=True` returns none).
    """

    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    task: Task
    description: str
    model_type: str = ""
    base_model_class: type[PreTrainedModel] | None = None
    tokenizer: Literal["bpe", "byte"] = "bpe"
    trainer: str = "training.trainer:ZooTrainer"
    default_config: Mapping[str, Any] = field(default_factory=dict)
    tiny_config: Mapping[str, Any] = field(default_factory=dict)
    invalid_configs: tuple[tuple[Mapping[str, Any], str], ...] = ()
    benchmark_modes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    generate_method: str = "generate"
    supports_cache: bool = True
    lora_target_modules: tuple[str, ...] | None = None
    auxiliary_parameters: tuple[str, ...] = ()
    baseline_config: Callable[[PreTrainedConfig], LlamaConfig] = same_size_llama_config
    sample_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"do_sample": True, "top_k": 50, "temperature": 0.8}
    )
    eval_loss_is_bound: bool = False
    pretrained_loader: Callable[[str, Mapping[str, Any], bool], PreTrainedModel] | None = None
    seed_experiment: str | None = None
    card_tags: tuple[str, ...] = ()
    hard_context: bool = False
    base_model_required: str | None = None
    not_applicable: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_type:
            object.__setattr__(self, "model_type", self.config_class.model_type)

    def make_config(self, overrides: Mapping[str, Any] | None = None, *, tiny: bool = False) -> PreTrainedConfig:
        """Build a config from the defaults (or the tiny test config) updated with `overrides`.

        Raises:
            ValueError: an override names a field the config does not have, or the config rejects a value.
        """
        fields = dict(self.tiny_config if tiny else self.default_config)
        overrides = dict(overrides or {})
        known = set(self.config_class(**self.tiny_config).to_dict())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown config field(s) {unknown} for model_type '{self.model_type}'; "
                f"known fields: {', '.join(sorted(k for k in known if not k.startswith('_') and k not in _INTERNAL))}"
            )
        fields.update(overrides)
        try:
            return self.config_class(**fields)
        except StrictDataclassError as error:  # transformers' own configs validate through huggingface_hub
            raise ValueError(" ".join(str(error).split())) from None

    def load_pretrained(
        self, path: str, overrides: Mapping[str, Any] | None = None, trust_remote_code: bool = False
    ) -> PreTrainedModel:
        """Load a checkpoint of this architecture, with config `overrides` validated like a new config's.

        Raises:
            ValueError: an override names an unknown field or the config rejects a value.
        """
        overrides = dict(overrides or {})
        if self.pretrained_loader is not None:
            return self.pretrained_loader(path, overrides, trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        fields = config.to_dict()
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} for the checkpoint's model_type '{config.model_type}'")
        if overrides:
            fields.update(overrides)
            for key in ("model_type", "transformers_version", "architectures"):
                fields.pop(key, None)
            try:
                config = type(config)(**fields)
            except StrictDataclassError as error:
                raise ValueError(" ".join(str(error).split())) from None
        return self.model_class.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)


_INTERNAL = {"architectures", "model_type", "transformers_version", "dtype", "output_attentions",
             "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
             "is_encoder_decoder"}
_REGISTRY: dict[str, ArchitectureSpec] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add `spec` to the registry (an architecture's sub-package calls this on import) and, for an architecture that
    transformers does not ship, register its classes with the `Auto*` factories and for remote code: the config
    with `AutoConfig`, the headless model with `AutoModel`, the model with the task's factory
    (`AutoModelForCausalLM` / `AutoModelForMaskedLM`) and, for byte models, the byte tokenizer with `AutoTokenizer`.
    transformers' own models (the Llama baseline) are left as transformers registers them."""
    if spec.model_type in _REGISTRY and _REGISTRY[spec.model_type] is not spec:
        raise ValueError(f"model_type '{spec.model_type}' is already registered")
    if spec.model_type not in CONFIG_MAPPING_NAMES:
        _register_auto_classes(spec)
    _REGISTRY[spec.model_type] = spec
    return spec


def _register_auto_classes(spec: ArchitectureSpec) -> None:
    head_factory = AUTO_FACTORY_FOR_TASK[spec.task]
    AutoConfig.register(spec.model_type, spec.config_class, exist_ok=True)
    head_factory.register(spec.config_class, spec.model_class, exist_ok=True)
    spec.config_class.register_for_auto_class()
    spec.model_class.register_for_auto_class(head_factory.__name__)
    if spec.base_model_class is not None:
        AutoModel.register(spec.config_class, spec.base_model_class, exist_ok=True)
        spec.base_model_class.register_for_auto_class("AutoModel")
    if spec.tokenizer == "byte":
        from .tokenization_byte import ByteTokenizer

        AutoTokenizer.register(spec.config_class, slow_tokenizer_class=ByteTokenizer, exist_ok=True)


def get_spec(model_type: str) -> ArchitectureSpec:
    """The spec of `model_type`.

    Raises:
        ValueError: `model_type` is not registered (the message lists the known ones).
    """
    try:
        return _REGISTRY[model_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model_type '{model_type}'; known model types: {known}") from None


def all_specs() -> list[ArchitectureSpec]:
    """Every registered spec, sorted by model type."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """Parse `"hidden_size=128,num_hidden_layers=4,do_toep_mean=false"` into a dict.

    Values are read as JSON where possible (numbers, `true`/`false`/`null`, lists such as `[0,1]`), lists of bare
    words as lists of strings (`arms=[faithful,logit_scale]`), else kept as strings. Commas inside brackets do not
    split.

    Raises:
        ValueError: an item is not of the form `key=value`.
    """
    result: dict[str, Any] = {}
    if not text:
        return result
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"bad config override '{item}': expected key=value, e.g. hidden_size=128")
        result[key] = _parse_value(raw)
    return result


def _parse_value(raw: str) -> Any:
    """A JSON value (`true`/`none` in any case too), a bracketed list of such values or bare words (`[a,b]` ->
    `["a", "b"]`), else the string itself."""
    lowered = {"true": "true", "false": "false", "none": "null", "null": "null"}.get(raw.lower(), raw)
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        if raw.startswith("[") and raw.endswith("]") and "[" not in raw[1:-1]:
            return [_parse_value(item.strip()) for item in raw[1:-1].split(",") if item.strip()]
        return raw
