"""The options base of the training objectives: `--objective_args key=value,...` parsed into a dataclass.

An objective's options are a dataclass deriving from `ObjectiveOptions`. Its annotations are the schema: `bool`,
`int`, `float`, `str`, `Literal[...]` (the allowed values), `list[X]`, `X | None`; every field is checked against
its annotation with the zoo's validators (`check_bool`, `check_choice`) when the options are
built, so a bad value fails in one line naming its field. The same dataclass is what `HfArgumentParser` parses
(`from_args` builds it through `HfArgumentParser.parse_dict`), so an objective's options could equally be given as
command-line flags or a JSON file. Old spellings of a value (`DEPRECATED_VALUES`) keep working with a
`FutureWarning`.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from transformers import HfArgumentParser

from hf_models.configuration_zoo_common import check_bool, check_choice


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` (bools are not numbers; ints are floats)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_option(name: str, value: Any, hint: Any) -> None:
    """Raise a one-line `ValueError` naming `name` unless `value` has the annotated type `hint`."""
    if _matches(value, hint):
        return
    origin, args = get_origin(hint), get_args(hint)
    if (origin is Union or origin is types.UnionType) and type(None) in args and len(args) == 2:
        hint = next(arg for arg in args if arg is not type(None))  # name the type, not "... or None"
        origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        check_choice(name, value, args)
    elif hint is bool:
        check_bool(name, value)
    kind = {str: "a string", int: "an integer", float: "a number", bool: "a bool"}.get(hint)
    if origin is list:
        kind = f"a list of {getattr(args[0], '__name__', args[0])}, e.g. [1,2]"
    raise ValueError(f"`{name}` must be {kind or hint}, got {value!r}.")


class ObjectiveOptions:
    """Base of the options of a training objective (a dataclass subclass holds the fields).

    Class attributes:
        objective_name: how error messages name the objective ("the NPT objective").
        DEPRECATED_VALUES: `{field: {old value: new value}}`; an old value is replaced by the new one with a
            `FutureWarning`.

    Subclasses turn shorthand spellings into the annotated types in `prepare`, put their range and cross-field
    checks in `validate` (each field's type and choices are checked between the two) and define no `__post_init__`.
    """

    objective_name: ClassVar[str] = "the objective"
    DEPRECATED_VALUES: ClassVar[dict[str, dict[Any, Any]]] = {}

    def __post_init__(self) -> None:
        self.prepare()
        for name, renames in self.DEPRECATED_VALUES.items():
            old = getattr(self, name)
            if isinstance(old, str) and old in renames:
                warnings.warn(f"{name}={old} is deprecated and will be removed; use {name}={renames[old]}",
                              FutureWarning, stacklevel=3)
                object.__setattr__(self, name, renames[old])  # also for frozen dataclasses
        hints = get_type_hints(type(self))
        for option in fields(self):
            check_option(option.name, getattr(self, option.name), hints[option.name])
        self.validate()

    def prepare(self) -> None:
        """Turn a subclass's shorthand spellings into the annotated types (e.g. a `+`-joined string into a list),
        before any check."""

    def validate(self) -> None:
        """Range and cross-field checks of a subclass; raise a one-line `ValueError` naming the field."""

    @classmethod
    def from_args(cls, objective_args: Mapping[str, Any]) -> ObjectiveOptions:
        """Build from the parsed `--objective_args` (a dict of JSON values).

        Raises:
            ValueError: an unknown argument (the message lists the known ones) or an invalid value.
        """
        known = sorted(option.name for option in fields(cls))
        unknown = sorted(set(objective_args) - set(known))
        if unknown:
            raise ValueError(f"unknown objective argument(s) {unknown} for {cls.objective_name}; known: "
                             f"{', '.join(known)}")
        (options,) = HfArgumentParser(cls).parse_dict(dict(objective_args))
        return options


__all__ = ["ObjectiveOptions", "check_option"]
