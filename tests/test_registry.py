"""The registry: lookups, `--config_overrides` parsing, and every registered architecture being complete and
documented."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_models
from hf_models.registry import ArchitectureSpec, get_spec, parse_config_overrides, register
from training.trainer import ZooTrainer, resolve_trainer

from .conftest import SPECS, spec_id

ROOT = Path(__file__).resolve().parents[1]


def test_parse_config_overrides():
    assert parse_config_overrides(None) == {}
    parsed = parse_config_overrides("hidden_size=128, do_toep_mean=False,npt_layers=[0,2],np_init=zero_b,x=none,y=0.5")
    assert parsed == {"hidden_size": 128, "do_toep_mean": False, "npt_layers": [0, 2], "np_init": "zero_b",
                      "x": None, "y": 0.5}
    assert parse_config_overrides("arms=[faithful,logit_scale],p=[0,0.2],m=[a,1,none]") == {
        "arms": ["faithful", "logit_scale"], "p": [0, 0.2], "m": ["a", 1, None]}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_config_overrides("hidden_size")


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        get_spec("gpt5")
    assert "llama" in str(error.value) and "gpt5" in str(error.value)


def test_a_model_type_cannot_be_registered_twice():
    spec = get_spec("llama")
    assert register(spec) is spec
    with pytest.raises(ValueError, match="already registered"):
        register(ArchitectureSpec(model_type="llama", config_class=spec.config_class, model_class=spec.model_class,
                                  task="causal-lm", description="another"))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_architecture_is_complete(spec: ArchitectureSpec):
    assert spec.description and spec.tiny_config and spec.invalid_configs
    assert issubclass(resolve_trainer(spec), ZooTrainer)
    assert callable(getattr(spec.model_class, spec.generate_method))
    assert spec.model_class.config_class is spec.config_class
    assert spec.make_config(tiny=True).model_type == spec.model_type
    if spec.seed_experiment:
        assert (ROOT / "benchmarks" / f"{spec.seed_experiment.rsplit('.', 1)[-1]}.py").exists()


def test_public_names_are_exported():
    assert all(hasattr(hf_models, name) for name in hf_models.__all__)
    for spec in SPECS:
        if spec.model_type != "llama":
            assert getattr(hf_models, spec.model_class.__name__) is spec.model_class
            assert getattr(hf_models, spec.config_class.__name__) is spec.config_class


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_readme_lists_every_architecture(spec: ArchitectureSpec):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"^\| `{spec.model_type}` \|", readme, flags=re.MULTILINE), spec.model_type


def test_importing_hf_models_leaves_transformers_unchanged():
    script = textwrap.dedent("""
        from transformers import dynamic_module_utils
        before = dynamic_module_utils.get_relative_imports
        import hf_models
        from hf_models.configuration_zoo_common import parent_imports_skipped
        assert dynamic_module_utils.get_relative_imports is before, "import hf_models patched transformers"
        with parent_imports_skipped():
            assert dynamic_module_utils.get_relative_imports is not before
        assert dynamic_module_utils.get_relative_imports is before, "the patch outlived its block"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_registering_a_new_architecture_registers_its_auto_classes():
    from torch import nn
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

    from hf_models import registry

    class ToyConfig(PreTrainedConfig):
        model_type = "zoo_registry_toy"

    class ToyPreTrained(PreTrainedModel):
        config_class = ToyConfig

    class ToyModel(ToyPreTrained):
        def __init__(self, config):
            super().__init__(config)
            self.layer = nn.Linear(2, 2)
            self.post_init()

    class ToyForCausalLM(ToyModel):
        pass

    spec = ArchitectureSpec(model_type="zoo_registry_toy", config_class=ToyConfig, model_class=ToyForCausalLM,
                            base_model_class=ToyModel, task="causal-lm", description="a toy")
    try:
        register(spec)
        config = AutoConfig.for_model("zoo_registry_toy")
        assert type(config) is ToyConfig
        assert type(AutoModelForCausalLM.from_config(config)) is ToyForCausalLM
        assert type(AutoModel.from_config(config)) is ToyModel
        assert ToyConfig._auto_class == "AutoConfig" and ToyForCausalLM._auto_class == "AutoModelForCausalLM"
        assert ToyModel._auto_class == "AutoModel"
    finally:
        registry._REGISTRY.pop("zoo_registry_toy", None)
