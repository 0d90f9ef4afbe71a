"""training: the zoo's data pipeline, training CLI (`python -m training.train`), push CLI
(`python -m training.push`) and the `Trainer` subclasses that implement each architecture's objective.

Every trainer an architecture registers (`ArchitectureSpec.trainer = "training.<module>:<Class>"`) is available
as `training.<Class>`, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import ObjectiveOptions
from .trainer import ZooTrainer

__all__ = ["ObjectiveOptions", "ZooTrainer"]


def __getattr__(name: str) -> Any:
    import hf_models

    for spec in hf_models.all_specs():
        module_name, _, class_name = spec.trainer.partition(":")
        if class_name == name:
            return getattr(importlib.import_module(module_name), class_name)
    raise AttributeError(f"module 'training' has no attribute '{name}'")
