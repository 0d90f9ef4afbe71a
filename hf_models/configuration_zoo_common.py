"""Shared configuration machinery of the zoo: field validation and remote-code bundling.

Every architecture's `configuration_<name>.py` imports from here, so this file must only depend on `torch`,
`transformers` and the standard library: it is copied next to the weights when a model is saved (see
`bundle_remote_code`), so that `from_pretrained(folder, trust_remote_code=True)` works where `hf_models` is not
installed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig, dynamic_module_utils

_PARENT_IMPORT = re.compile(r"^(\s*)from \.\.(\w+) import", flags=re.MULTILINE)


@contextmanager
def parent_imports_skipped() -> Iterator[None]:
    """Within the block, transformers' `get_relative_imports` ignores `from ..x import` lines.

    Transformers reads `from ..x import` as a sibling `.x` and then fails to copy a file `.x.py` when a custom
    model is saved; parent imports are bundled by `bundle_remote_code` instead. The zoo's `save_pretrained`
    overrides wrap the parent call in this block, so transformers is unchanged outside it.
    """
    original = dynamic_module_utils.get_relative_imports

    def relative_imports(module_file: str | Path) -> list[str]:
        return [name for name in original(module_file) if not name.startswith(".")]

    dynamic_module_utils.get_relative_imports = relative_imports
    try:
        yield
    finally:
        dynamic_module_utils.get_relative_imports = original


def bundle_remote_code(folder: str | Path) -> list[Path]:
    """Make the modeling files saved in `folder` self-contained.

    `transformers` copies a custom model's module and its sibling imports (`from .x import`) next to the
    weights, but not modules from a parent package (`from ..x import`). This copies each such shared module
    of `hf_models` into `folder` and rewrites the import to the sibling form, recursively.

    Returns:
        The files copied into `folder`.
    """
    folder = Path(folder)
    package_dir = Path(__file__).resolve().parent
    copied: list[Path] = []
    pending = sorted(folder.glob("*.py"))
    while pending:
        path = pending.pop()
        source = path.read_text(encoding="utf-8")
        needed = set(_PARENT_IMPORT.findall(source))
        if not needed:
            continue
        path.write_text(_PARENT_IMPORT.sub(r"\1from .\2 import", source), encoding="utf-8")
        for _, module in needed:
            target = folder / f"{module}.py"
            if not target.exists():
                shutil.copyfile(package_dir / f"{module}.py", target)
                copied.append(target)
                pending.append(target)
    return copied


def check_positive(name: str, value: Any, *, allow_zero: bool = False, integer: bool = True) -> None:
    """Raise a `ValueError` naming `name` unless `value` is a positive (or non-negative) number."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a `ValueError` naming `name` unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raise a `ValueError` naming `name` unless `value` is `True` or `False` (not `1`, `0.0` or `"true"`, which
    `check_choice(name, value, (True, False))` would let through because `1 == True`)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (true or false), got {value!r}.")


def check_interval(name: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> None:
    """Raise a `ValueError` naming `name` unless `low <= value < high` (or `<= high` when `closed_high`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"`{name}` must lie in [{low}, {high}{bracket}, got {value}.")


class RemoteCodeConfigMixin:
    """Mixed in before a `PreTrainedConfig` class: `save_pretrained` also bundles the zoo's shared modules (see
    `bundle_remote_code`), so the saved folder carries its code.

    A plain class, not a config: mixed into a `LlamaConfig` subclass (NPT's) it leaves Llama's dataclass `__init__`
    and defaults in place, where a `PreTrainedConfig` base would put its own `__init__` first.
    """

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        with parent_imports_skipped():
            super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        bundle_remote_code(save_directory)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", Path(save_directory).name), **kwargs)


class ZooConfig(RemoteCodeConfigMixin, PreTrainedConfig):
    """Base class of the zoo's configurations: a `PreTrainedConfig` whose saved folders carry their code."""
