"""The zoo's `Trainer` base: the plain language-model objective, logging of loss components, and the hook through
which the training CLI builds the trainer an architecture registered."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, default_data_collator

from hf_models.registry import ArchitectureSpec

from .options import ObjectiveOptions


@dataclass(frozen=True)
class CLIInputs:
    """What the training CLI hands `ZooTrainer.from_cli` besides the objective arguments (see there)."""

    model: PreTrainedModel
    args: TrainingArguments
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset
    eval_dataset: Dataset
    train_texts: Dataset


class ZooTrainer(Trainer):
    """`Trainer` for the plain language-model loss (the one the model computes from `labels`).

    Subclasses that implement another objective override `compute_loss` and call
    `record_loss_components(name=tensor, ...)` for each part of the loss; the parts are averaged over the
    optimizer steps since the last log and appear in the Trainer's logs as `loss_<name>` beside `loss`. Such a
    `compute_loss` returns a per-batch mean, so the Trainer divides it by the gradient-accumulation steps
    (`loss_is_scaled_for_ga = False`, set for every subclass that overrides `compute_loss` unless it says otherwise).
    An objective with `--objective_args` sets `options_class` (an `ObjectiveOptions` dataclass) and overrides
    `objective_kwargs`, the hook through which `from_cli` passes the options (and anything built from them) on.
    """

    options_class: ClassVar[type[ObjectiveOptions] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "compute_loss" in vars(cls) and "loss_is_scaled_for_ga" not in vars(cls):
            cls.loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_counts: dict[str, int] = {}

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; under `--fsdp` on a multi-process CPU job (gloo) also the FSDP plugin, which
        accelerate keeps for accelerator devices (its state stays `MULTI_CPU`, and the Trainer would silently run
        DDP instead). FSDP2 itself shards on CPU: the zoo sets the plugin the Trainer built from `--fsdp` /
        `--fsdp_config` on the accelerator state, so the model is wrapped with `fully_shard` as on GPUs."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled \
                and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
            self.shards_on_cpu = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's; a model sharded on CPU (see `create_accelerator_and_postprocess`) is gathered shard by
        shard on every rank (`DTensor.full_tensor`), then saved by the main process (accelerate's gather offloads
        to a CPU copy that safetensors cannot read there)."""
        if not getattr(self, "shards_on_cpu", False):
            return super().save_model(output_dir, _internal_call)
        state_dict = {name: tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                      for name, tensor in self.model.state_dict().items()}
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def record_loss_components(self, **components: torch.Tensor | float) -> None:
        """Accumulate detached loss parts of one training forward pass for the next training log."""
        if not self.model.training:
            return
        for name, value in components.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._component_sums[name] = self._component_sums.get(name, 0.0) + value
            self._component_counts[name] = self._component_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_sums:
            for name, total in self._component_sums.items():
                logs[f"loss_{name}"] = round(float(total) / self._component_counts[name], 4)
            self._component_sums, self._component_counts = {}, {}
        super().log(logs, start_time)

    @classmethod
    def from_cli(
        cls,
        *,
        model: PreTrainedModel,
        args: TrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Dataset,
        eval_dataset: Dataset,
        objective_args: Mapping[str, Any],
        train_texts: Dataset,
    ) -> ZooTrainer:
        """Build the trainer the training CLI runs: `objective_args` become `cls.options_class` (refused when the
        class has none), then `objective_kwargs` adds what the objective needs to the `Trainer` arguments.

        Args:
            model: the model to train.
            args: the `TrainingArguments` from the command line.
            tokenizer: the model's tokenizer (saved with every checkpoint).
            train_dataset / eval_dataset: packed blocks with `input_ids` and `labels`.
            objective_args: `--objective_args` parsed into a dict (options of the objective; none for the plain
                language-model loss).
            train_texts: the training documents (a `text` column), for objectives that need the raw text, e.g.
                to fit a teacher tokenizer.

        Raises:
            ValueError: an unknown or invalid objective argument, or options that do not fit the model or data.
        """
        if cls.options_class is None:
            if objective_args:
                raise ValueError(f"{cls.__name__} takes no --objective_args, got {sorted(objective_args)}")
            options = None
        else:
            options = cls.options_class.from_args(objective_args)
        inputs = CLIInputs(model=model, args=args, tokenizer=tokenizer, train_dataset=train_dataset,
                           eval_dataset=eval_dataset, train_texts=train_texts)
        kwargs = {"model": model, "args": args, "processing_class": tokenizer, "train_dataset": train_dataset,
                  "eval_dataset": eval_dataset, "data_collator": default_data_collator}
        kwargs.update(cls.objective_kwargs(options, inputs))
        return cls(**kwargs)

    @classmethod
    def objective_kwargs(cls, options: ObjectiveOptions | None, inputs: CLIInputs) -> dict[str, Any]:
        """The hook of `from_cli`: check `options` against the model and data, and return the `__init__` keyword
        arguments the objective adds or replaces (e.g. `{"objective": options}`, or a `train_dataset` with extra
        columns). The plain language-model loss adds none."""
        return {}


def resolve_trainer(spec: ArchitectureSpec) -> type[ZooTrainer]:
    """The `Trainer` subclass registered for `spec` (`"module:Class"`, imported on demand)."""
    module_name, _, class_name = spec.trainer.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
