"""`NPTTrainer`, which `python -m training.train --model_type npt_llama` runs, and `freeze_base`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_models.npt import NPTForCausalLM

from ..trainer import CLIInputs, ZooTrainer
from .objective import NPTLossModule, NPTLossOptions
from .teacher import capture_teacher

LOSS_WEIGHTING_FILE = "npt_loss_weighting.json"  # beside a checkpoint's weights: the adaptive weights' state


class NPTTrainer(ZooTrainer):
    """Distils the NPT layers of an `NPTForCausalLM` from its own base (teacher = `npt_disabled()`): only the NP
    parameters (and the uncertainty log-variances) train. Each loss component, its weight, the stage and scalar
    statistics are logged as `loss_<name>`, `loss_weight_<name>`, `loss_stage`, `loss_s_var_l<i>`.

    In evaluation the loss is the NPT model's next-token cross-entropy (so the CLI's perplexity is the NPT model's,
    not an exponentiated distillation loss); `evaluate_npt` gives the fidelity metrics.

    Args:
        loss_module: the `NPTLossModule` (default options when omitted).
    """

    options_class = NPTLossOptions

    def __init__(self, *args: Any, loss_module: NPTLossModule | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        if not isinstance(model, NPTForCausalLM):
            if hasattr(model, "peft_config"):  # a PEFT wrapper
                raise ValueError("the NPT objective trains only the NP parameters (the base stays frozen): LoRA "
                                 "adapters do not apply to npt_llama")
            raise ValueError(f"NPTTrainer trains an NPTForCausalLM, got {type(model).__name__}")
        loss_module = loss_module or NPTLossModule()
        if "ib" in loss_module.options.losses and loss_module.options.ib_impl == "vib" \
                and not model.config.np_variational:
            raise ValueError("ib_impl=vib is the KL of a variational bottleneck: the model needs np_variational=True "
                             "(e.g. --config_overrides np_variational=true)")
        freeze_base(model)
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            raise ValueError("the NPT objective reads the generators' weights outside the forward pass (the "
                             "regularisers' Gram matrices), which FSDP keeps sharded: train NPT with data parallelism "
                             "(torchrun without --fsdp); its trainable NP parameters are small")
        # its adaptive weights (GradNorm, uncertainty log-variances) live beside the model's parameters
        self.loss_module = loss_module.to(self.args.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        state = self.loss_module.weighting_state()
        if state:
            path = Path(output_dir or self.args.output_dir) / LOSS_WEIGHTING_FILE
            path.write_text(json.dumps(state), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / LOSS_WEIGHTING_FILE
        if path.is_file():
            self.loss_module.load_weighting_state(json.loads(path.read_text(encoding="utf-8")))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        extra = self.loss_module.trainable_parameters()
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        npt_model = self.accelerator.unwrap_model(model)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if not model.training and "labels" in inputs:
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=inputs["labels"],
                           use_cache=False)
            return (output.loss, {"logits": output.logits}) if return_outputs else output.loss
        teacher = capture_teacher(npt_model, input_ids, attention_mask, inputs.get("position_ids"))
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=inputs.get("position_ids"),
                       output_npt=True, use_cache=False)
        result = self.loss_module(npt_model, output.npt, teacher, output.logits, mask, step=self.state.global_step)
        self.record_loss_components(
            **result.components,
            **{f"weight_{name}": value for name, value in result.weights.items()},
            **result.metrics,
        )
        return (result.total, {"logits": output.logits}) if return_outputs else result.total

    @classmethod
    def objective_kwargs(cls, options: NPTLossOptions, inputs: CLIInputs) -> dict[str, Any]:
        """`from_cli`'s hook (`python -m training.train --model_type npt_llama`; see `NPTLossOptions` for the
        `--objective_args`): the loss module of the options."""
        return {"loss_module": NPTLossModule(options)}


def freeze_base(model: NPTForCausalLM) -> list[str]:
    """Make only the NP-component parameters trainable; returns their names."""
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".np_component." in name)
        if parameter.requires_grad:
            names.append(name)
    return names

