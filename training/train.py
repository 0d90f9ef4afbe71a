"""Train any architecture of the zoo on a corpus, evaluate it, sample from it and save a Hub-ready folder.

    python -m training.train --model_type llama --config_overrides "hidden_size=128,num_hidden_layers=4" \\
        --train_file stories.txt --output_dir out/llama --max_steps 300

The folder holds the weights (safetensors), config, tokenizer, the modeling code (remote code), the metrics,
a loss-curve PNG and a model card. Runs under `accelerate launch` and `torchrun` as well.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

import hf_models
from hf_models.registry import ArchitectureSpec, all_specs, get_spec, parse_config_overrides
from model_cards import BENCHMARK_FILE, LOSS_CURVE_FILE, plot_loss_curve, write_model_card

from .common import UsageError, run_cli
from .data import KNOWN_CORPORA, DataArguments, PackedSplit, load_documents, tokenize_and_pack
from .metrics import exact_bits_per_byte
from .tokenization import load_tokenizer, record_model_max_length, token_byte_lengths, train_bpe_tokenizer
from .trainer import ZooTrainer, resolve_trainer

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TRAINING_DEFAULTS = {"learning_rate": 1e-3, "warmup_steps": 0.05, "lr_scheduler_type": "cosine", "logging_steps": 10}


@dataclass
class ModelArguments:
    """Which architecture, at what size, from which starting point, with which tokenizer."""

    model_type: str | None = field(
        default=None, metadata={"help": "A registered architecture: " + ", ".join(s.model_type for s in all_specs())
                                + " (default: llama, or the checkpoint's type)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields to change, e.g. 'hidden_size=128,num_hidden_layers=4'."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from this checkpoint (folder or Hub id) instead of a new model; "
                                "for npt_llama, the Llama base to convert (required)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id. Without it: the checkpoint's tokenizer, the byte tokenizer "
                  "for byte models, else a BPE trained on the training documents."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the BPE trained when none is given."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from a Hub checkpoint."})
    objective_args: str | None = field(
        default=None, metadata={"help": "Options of the architecture's training objective, 'key=value,...'."}
    )
    sample_prompt: str = field(default="Once upon a time", metadata={"help": "Prompt of the sample at the end."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of the sample at the end."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir (refused otherwise, unless resuming from a checkpoint)."},
    )
    lora_r: int = field(
        default=0, metadata={"help": "Train PEFT LoRA adapters of this rank instead of every weight (0: off); the "
                             "output folder then holds the adapter (adapter_model.safetensors)."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA inputs."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names LoRA adapts (default: the architecture's, "
                                "e.g. q_proj,v_proj for Llama)."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the adapters merged into the base weights in <output_dir>/merged, "
                                 "a folder that loads without PEFT."}
    )


def parse_args(argv: Sequence[str] | None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line; `--output_dir` is required."""
    argv = list(sys.argv[1:] if argv is None else argv)
    asks_help = any(arg in ("-h", "--help") for arg in argv)
    if not asks_help and not any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in argv):
        raise UsageError("--output_dir is required: the folder that receives the trained model")
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # The Trainer's defaults suit fine-tuning (5e-5, a log every 500 steps); these suit the small models trained
    # from scratch here. Every one can still be set on the command line.
    parser.set_defaults(**TRAINING_DEFAULTS)
    if _launched_on_cpu_only():
        # The Trainer joins a torchrun / accelerate process group on CPU only with `use_cpu`; without it each rank
        # would train alone on the whole batch.
        parser.set_defaults(use_cpu=True)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def _launched_on_cpu_only() -> bool:
    """Whether this process is one of several started by a launcher (`torchrun`, `accelerate launch`) on a
    machine without an accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerators = (torch.cuda, getattr(torch, "xpu", None), getattr(torch.backends, "mps", None))
    return not any(backend is not None and backend.is_available() for backend in accelerators)


def _check_checkpoint(path: str) -> None:
    """A local checkpoint folder must hold weights."""
    folder = Path(path)
    if folder.exists() and not any((folder / name).exists() for name in WEIGHT_FILES):
        raise UsageError(f"checkpoint folder {path} has no weights ({' or '.join(WEIGHT_FILES)})")


def _check_output_dir(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Refuse to mix a new run into a folder that already holds files (an old card, benchmark or checkpoints)."""
    folder = Path(training_args.output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not model_args.overwrite_output_dir \
            and training_args.resume_from_checkpoint is None:
        raise UsageError(f"--output_dir {folder} is not empty: pass --overwrite_output_dir to train into it, or "
                         "--resume_from_checkpoint to continue a run")


def _resolve_spec(model_args: ModelArguments) -> ArchitectureSpec:
    model_type = model_args.model_type
    if model_type is None and model_args.model_name_or_path:
        model_type = _load_config(model_args.model_name_or_path, model_args.trust_remote_code).model_type
    try:
        return get_spec(model_type or "llama")
    except ValueError as error:
        raise UsageError(str(error)) from None


def _load_config(path: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if Path(path).exists() else " (a Hub id: offline, set HF_HUB_OFFLINE=1 to fail at once, or pass a local folder)"
        raise UsageError(f"could not load a config from '{path}': {str(error).splitlines()[0]}{hint}") from None


def resolve_tokenizer(
    spec: ArchitectureSpec, model_args: ModelArguments, training_args: TrainingArguments, train_texts
) -> PreTrainedTokenizerBase:
    """The tokenizer of this run (see `--tokenizer_name`)."""
    source = model_args.tokenizer_name or training_args.resume_from_checkpoint or model_args.model_name_or_path
    if source:
        return load_tokenizer(source, model_args.trust_remote_code)
    if spec.tokenizer == "byte":
        return hf_models.ByteTokenizer()
    return train_bpe_tokenizer(train_texts["text"], vocab_size=model_args.vocab_size)


def _token_fields(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    fields = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if getattr(tokenizer, "mask_token_id", None) is not None:
        fields["mask_token_id"] = tokenizer.mask_token_id
    return fields


def config_for_tokenizer(
    spec: ArchitectureSpec,
    tokenizer: PreTrainedTokenizerBase,
    overrides: dict[str, Any] | None = None,
    *,
    tiny: bool = False,
):
    """The spec's config (defaults, or the tiny test config) with the vocabulary and special ids of `tokenizer`,
    then `overrides`.

    Raises:
        ValueError: an override names an unknown field or the config rejects a value.
    """
    known = set(spec.make_config(tiny=True).to_dict())
    fields = {key: value for key, value in _token_fields(tokenizer).items() if key in known}
    return spec.make_config({**fields, **(overrides or {})}, tiny=tiny)


def build_model(
    spec: ArchitectureSpec,
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> PreTrainedModel:
    """A new model of `spec` sized by its defaults and `--config_overrides`, or the `--model_name_or_path` one."""
    try:
        overrides = parse_config_overrides(model_args.config_overrides)
        if model_args.model_name_or_path:
            model = spec.load_pretrained(model_args.model_name_or_path, overrides, model_args.trust_remote_code)
        else:
            model = spec.model_class(config_for_tokenizer(spec, tokenizer, overrides))
    except (OSError, ValueError) as error:
        raise UsageError(" ".join(str(error).split())) from None
    config = model.config
    if config.vocab_size < len(tokenizer):
        raise UsageError(f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and block_size > context:
        raise UsageError(f"--block_size {block_size} exceeds the model's max_position_embeddings {context}")
    return model


def wrap_with_lora(spec: ArchitectureSpec, model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """The model wrapped by PEFT's `get_peft_model` with LoRA adapters (`--lora_*`), or the model itself when
    `--lora_r` is 0."""
    if model_args.lora_r <= 0:
        if model_args.merge_lora:
            raise UsageError("--merge_lora needs adapters to merge: pass --lora_r (e.g. --lora_r 8)")
        return model
    if spec.lora_target_modules is None and not model_args.lora_target_modules:
        raise UsageError(f"LoRA has no default target modules for {spec.model_type}: pass --lora_target_modules")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("LoRA needs PEFT: pip install peft (or the package's [lora] extra)") from None
    targets = ([name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
               if model_args.lora_target_modules else list(spec.lora_target_modules))
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM" if spec.task == "causal-lm" else None)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(" ".join(str(error).split())) from None


def sample_text(spec: ArchitectureSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                prompt: str, max_new_tokens: int, seed: int) -> str:
    """Generate a continuation of `prompt` with the architecture's generation method and sampling settings."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = getattr(model, spec.generate_method)(
            **inputs, max_new_tokens=max_new_tokens, **spec.sample_kwargs
        )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return tokenizer.decode(sequences[0], skip_special_tokens=False)


def language_model_metrics(eval_loss: float, validation: PackedSplit, *, bound: bool = False,
                           exact_bpb: float | None = None) -> dict[str, float]:
    """Perplexity and bits per byte from the mean evaluation loss (nats per token); with `bound` (the loss is an
    upper bound on the NLL, see `ArchitectureSpec.eval_loss_is_bound`) the names end in `_bound`. `exact_bpb` (see
    `training.metrics.exact_bits_per_byte`) is reported as the bits per byte; without it (a bound) the figure is the
    mean loss × tokens per byte, the EOS counted as one byte."""
    suffix = "_bound" if bound else ""
    bits_per_byte = exact_bpb if exact_bpb is not None else eval_loss * validation.tokens_per_byte / math.log(2)
    return {
        f"eval_perplexity{suffix}": math.exp(min(eval_loss, 50.0)),
        f"eval_bits_per_byte{suffix}": bits_per_byte,
        f"eval_bits_per_token{suffix}": eval_loss / math.log(2),
    }


def main(argv: Sequence[str] | None = None) -> ZooTrainer:
    """Run the training CLI; returns the trainer (tests and the distributed worker inspect it)."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_output_dir(model_args, training_args)
    if model_args.model_name_or_path:
        _check_checkpoint(model_args.model_name_or_path)
    if training_args.resume_from_checkpoint:  # a local folder, never a Hub id
        if not Path(training_args.resume_from_checkpoint).is_dir():
            raise UsageError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such checkpoint folder")
        _check_checkpoint(training_args.resume_from_checkpoint)
    spec = _resolve_spec(model_args)
    try:
        objective_args = parse_config_overrides(model_args.objective_args)
    except ValueError as error:
        raise UsageError(str(error).replace("config override", "objective argument")) from None
    if spec.base_model_required and not model_args.model_name_or_path:
        raise UsageError(spec.base_model_required)
    if not model_args.model_name_or_path:  # a bad override fails now, not after the corpus and tokenizer
        try:
            spec.make_config(parse_config_overrides(model_args.config_overrides))
        except ValueError as error:
            raise UsageError(" ".join(str(error).split())) from None

    documents = load_documents(data_args, seed=training_args.seed)
    tokenizer = resolve_tokenizer(spec, model_args, training_args, documents["train"])
    set_seed(training_args.seed)  # before the model exists: the initial weights are seeded too
    model = build_model(spec, model_args, tokenizer, data_args.block_size)
    record_model_max_length(tokenizer, spec, model.config)
    model = wrap_with_lora(spec, model, model_args)
    train = tokenize_and_pack(documents["train"], tokenizer, data_args.block_size, split_name="train",
                              num_proc=data_args.preprocessing_num_workers)
    validation = tokenize_and_pack(documents["validation"], tokenizer, data_args.block_size, split_name="validation",
                                   num_proc=data_args.preprocessing_num_workers)
    try:
        trainer = resolve_trainer(spec).from_cli(
            model=model, args=training_args, tokenizer=tokenizer, train_dataset=train.blocks,
            eval_dataset=validation.blocks, objective_args=objective_args, train_texts=documents["train"],
        )
    except ValueError as error:
        raise UsageError(str(error)) from None

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**train_result.metrics, **trainer.evaluate()}
    exact_bpb = None
    if spec.task == "causal-lm":  # every rank runs it: a sharded (FSDP) model gathers its weights in each forward
        exact_bpb = exact_bits_per_byte(trainer.model, validation.blocks, token_bytes=token_byte_lengths(tokenizer),
                                        batch_size=training_args.per_device_eval_batch_size,
                                        shift=getattr(trainer.model.config, "chunk_size", 1))
    metrics.update(language_model_metrics(metrics["eval_loss"], validation, bound=spec.eval_loss_is_bound,
                                          exact_bpb=exact_bpb))
    # A sharded (FSDP) model gathers its weights in every forward pass and in `save_model`: every rank takes part.
    if not trainer.is_world_process_zero() and not trainer.is_fsdp_enabled:
        return trainer

    trainer.model.config.use_cache = True  # the Trainer switches it off for training; the saved model decodes cached
    sample = sample_text(spec, trainer.model, tokenizer, model_args.sample_prompt,
                         model_args.sample_max_new_tokens, training_args.seed)
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return trainer
    print(f"\n=== sample ===\n{sample}\n==============")
    # The card is filled from this run's files only: a benchmark of earlier weights no longer applies.
    for stale in (BENCHMARK_FILE, LOSS_CURVE_FILE):
        (output_dir / stale).unlink(missing_ok=True)
    # The Trainer pickles its arguments beside the weights; the folder keeps them as JSON instead (no pickles).
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    (output_dir / "training_args.json").write_text(training_args.to_json_string(), encoding="utf-8")
    trainer.save_state()
    trainer.save_metrics("all", metrics)
    from benchmarks.harness import environment, figure_title  # benchmarks imports training: not at the top

    title = figure_title(f"{spec.model_type} training loss", None, trainer.state.global_step,
                         environment(training_args.device, model.dtype))
    plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILE, title)
    _write_card(spec, trainer, data_args, training_args, train, validation, metrics, model_args, sample)
    if model_args.merge_lora:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output_dir / "merged")
        tokenizer.save_pretrained(output_dir / "merged")
        logger.info("adapters merged into the base weights: %s", output_dir / "merged")
    print(json.dumps({key: metrics[key] for key in ("eval_loss", "eval_perplexity", "eval_bits_per_byte",
                                                    "eval_perplexity_bound", "eval_bits_per_byte_bound")
                      if key in metrics}, indent=2))
    return trainer


def _describe_tokenizer(tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments) -> str:
    """The tokenizer in words for the card (not its Python class)."""
    if isinstance(tokenizer, hf_models.ByteTokenizer):
        return f"bytes: the zoo's byte tokenizer ({len(tokenizer)} ids, 256 bytes and the special tokens)"
    source = model_args.tokenizer_name or model_args.model_name_or_path
    origin = f"loaded from `{source}`" if source else "byte-level BPE trained on the training documents"
    return f"{origin}, {len(tokenizer)} tokens"


def _write_card(spec, trainer, data_args, training_args, train, validation, metrics, model_args, sample) -> None:
    model = trainer.model
    config = model.config.to_diff_dict()
    for key in ("transformers_version", "architectures", "auto_map", "dtype", "model_type"):
        config.pop(key, None)
    source = data_args.train_file or data_args.dataset_name
    tokenizer = trainer.processing_class
    known = KNOWN_CORPORA.get(Path(data_args.train_file).name) if data_args.train_file else None
    write_model_card(
        training_args.output_dir,
        model_type=spec.model_type,
        description=spec.description,
        auto_class="AutoModelForCausalLM" if spec.task == "causal-lm" else "AutoModelForMaskedLM",
        config=config,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        training={
            "data": f"`{Path(source).name if data_args.train_file else source}`"
                    + (f" (from `{known[0]}`, licence {known[1]})" if known else "")
                    + f": {train.num_documents:,} training / {validation.num_documents:,} validation documents, "
                      f"{train.num_tokens:,} training tokens",
            "tokenizer": _describe_tokenizer(tokenizer, model_args),
            "epochs": round(trainer.state.epoch or 0.0, 3),
            "block size": data_args.block_size,
            "optimizer steps": trainer.state.global_step,
            "batch size (per device × accumulation × devices)":
                f"{training_args.per_device_train_batch_size} × {training_args.gradient_accumulation_steps} × "
                f"{training_args.world_size}",
            "learning rate": f"{training_args.learning_rate} ({training_args.lr_scheduler_type.value}, warm-up "
                             f"{training_args.get_warmup_steps(trainer.state.max_steps)} steps)",
            "seed": training_args.seed,
            **({"adapters": f"PEFT LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}, on "
                            f"{', '.join(sorted(model.peft_config['default'].target_modules))} (this folder holds "
                            "the adapter; load it with `peft.AutoPeftModelForCausalLM`"
                            + ("; `merged/` holds the merged weights" if model_args.merge_lora else "") + ")"}
               if model_args.lora_r > 0 else {}),
            "device": str(training_args.device),
            "runtime (s)": metrics.get("train_runtime"),
            "final training loss (last log)": next(
                (entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None),
            "mean training loss over the run": metrics.get("train_loss"),
        },
        metrics={key: metrics[key] for key in ("eval_loss", "eval_perplexity", "eval_bits_per_byte",
                                               "eval_bits_per_token", "eval_perplexity_bound",
                                               "eval_bits_per_byte_bound", "eval_bits_per_token_bound")
                 if key in metrics},
        bpb_note=("Loss in nats per token. " + (
            "Bits per byte = loss × tokens / UTF-8 bytes / ln 2 over the validation documents "
            f"({validation.tokens_per_byte:.4f} tokens per byte, each document end counted as one byte). The "
            "evaluation loss is an upper bound on the negative log-likelihood (the model's variational bound), so "
            "the figures marked `_bound` bound perplexity and bits per byte from above."
            if spec.eval_loss_is_bound else
            "Bits per byte (exact) = the summed next-token losses of the validation tokens / ln 2 / the UTF-8 "
            "bytes those tokens stand for (document ends count no bytes and are not scored); it does not depend "
            "on the tokenizer.")),
        sample_prompt=model_args.sample_prompt,
        sample_text=sample,
        sample_settings=", ".join(f"{k}={v}" for k, v in spec.sample_kwargs.items()) or "greedy",
        datasets=[known[0]] if known else [] if data_args.train_file else [data_args.dataset_name],
        tags=spec.card_tags,
    )


if __name__ == "__main__":
    run_cli(main)
