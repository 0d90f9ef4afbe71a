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


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id rows with 0 into a batch: `input_ids` and `attention_mask`, both `(len(rows), longest)`."""
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def assert_same_generation(first, second, atol: float = 1e-4) -> None:
    """Two `generate(..., output_scores=True, return_dict_in_generate=True)` outputs: equal sequences, scores equal
    up to `atol` (absolute and relative)."""
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.scores, second.scores):
        torch.testing.assert_close(a, b, rtol=atol, atol=atol)


assert hf_models.all_specs(), "no architecture registered"
