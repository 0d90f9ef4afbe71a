"""The objectives' shared options base (`training.options.ObjectiveOptions`) and the one `ZooTrainer.from_cli`."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from training.diffusion import DiffusionObjective, DiffusionTrainer
from training.dual_head import DualHeadOptions, DualHeadTrainer
from training.npt import NPTLossOptions, NPTTrainer
from training.trainer import ZooTrainer, resolve_trainer

from .conftest import SPECS

OPTIONS = (DiffusionObjective, DualHeadOptions, NPTLossOptions)


@pytest.mark.parametrize("options_class", OPTIONS, ids=lambda cls: cls.__name__)
def test_unknown_objective_argument_is_refused_in_one_line_naming_it(options_class):
    with pytest.raises(ValueError, match=r"unknown objective argument\(s\) \['no_such_option'\] for the ") as error:
        options_class.from_args({"no_such_option": 1})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options_class,args,field", [
    (NPTLossOptions, {"orth_components": 1.5}, "orth_components"),
    (NPTLossOptions, {"curriculum_steps": [500, "x"]}, "curriculum_steps"),
    (NPTLossOptions, {"weight_mg": "2"}, "weight_mg"),
    (NPTLossOptions, {"schedule": 1}, "schedule"),
    (DualHeadOptions, {"curriculum": 1}, "curriculum"),
    (DualHeadOptions, {"teacher_tokenizer": 3}, "teacher_tokenizer"),
    (DualHeadOptions, {"plateau_window": 2.5}, "plateau_window"),
    (DiffusionObjective, {"mask_warmup_block": True}, "mask_warmup_block"),
    (DiffusionObjective, {"loss_weighting": "sum"}, "loss_weighting"),
])
def test_every_field_is_checked_against_its_annotation(options_class, args, field):
    # before the shared base, NPT took any type and the dual-head objective took curriculum=1 as true
    with pytest.raises(ValueError, match=f"`{field}` must be") as error:
        options_class.from_args(args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options_class", OPTIONS, ids=lambda cls: cls.__name__)
def test_options_are_argument_parser_dataclasses(options_class):
    (defaults,) = HfArgumentParser(options_class).parse_args_into_dataclasses(args=[])
    assert defaults == options_class()


def test_options_parse_from_command_line_flags():
    (options,) = HfArgumentParser(NPTLossOptions).parse_args_into_dataclasses(
        args=["--losses", "direct+mg", "--fidelity_impl", "mse", "--curriculum_steps", "10", "20"])
    assert options.losses == ["direct", "mg"] and options.fidelity_impl == "mse"
    assert options.curriculum_steps == [10, 20]


def test_one_from_cli_for_every_trainer():
    trainers = {resolve_trainer(spec) for spec in SPECS} | {DiffusionTrainer, DualHeadTrainer, NPTTrainer}
    for trainer in trainers:
        assert "from_cli" not in vars(trainer) or trainer is ZooTrainer, trainer.__name__
    assert DiffusionTrainer.options_class is DiffusionObjective
    assert DualHeadTrainer.options_class is DualHeadOptions
    assert NPTTrainer.options_class is NPTLossOptions
    assert ZooTrainer.options_class is None
