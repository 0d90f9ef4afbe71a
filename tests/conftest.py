"""Shared fixtures: the zoo's local corpora, the registered architectures and tiny seeded models."""

from __future__ import annotations

import os
from pathlib import Path

# Before transformers / huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import hf_models
from hf_models.registry import ArchitectureSpec, all_specs
from training.data import default_data_dir


SPECS = all_specs()
CAUSAL_SPECS = [spec for spec in SPECS if spec.task == "causal-lm"]
CACHED_SPECS = [spec for spec in CAUSAL_SPECS if spec.supports_cache]


def spec_id(spec: ArchitectureSpec) -> str:
    return spec.model_type


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The corpora folder (`$HF_ZOO_DATA`, else `../shared/data`): a missing folder fails, it does not skip."""
    return default_data_dir()


@pytest.fixture(scope="session")
def stories_file(data_dir: Path) -> Path:
    return data_dir / "tinystories_valid_sample.txt"


@pytest.fixture(scope="session")
def shakespeare_file(data_dir: Path) -> Path:
    return data_dir / "tinyshakespeare.txt"


def tiny_model(spec: ArchitectureSpec, seed: int = 0, **overrides):
    """The spec's tiny model, seeded, in eval mode."""
    torch.manual_seed(seed)
    return spec.model_class(spec.make_config(overrides, tiny=True)).eval()


assert hf_models.all_specs(), "no architecture registered"
