"""Helpers shared by the dataclass configs: validation that names the field, and dict/YAML round trips."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

from stllm_core.errors import ConfigError

T = TypeVar("T")


def check(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise ConfigError("Got {value!r} for `field`; expected ...") unless ok."""
    if not ok:
        raise ConfigError(f"Got {value!r} for `{field}`; expected {expected}.")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    check(value in choices, field, value, f"one of {', '.join(map(repr, choices))}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys by name (a typo must not be silently ignored)."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"Unknown field(s) {', '.join(unknown)} for {cls.__name__}{' in ' + where if where else ''}; "
            f"known fields: {', '.join(sorted(names))}."
        )
    return cls(**data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
