"""Helpers shared by the dataclass configs: validation that names the field, and dict/YAML round trips."""

from __future__ import annotations

import dataclasses
import re
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


_NAME = re.compile(r"^(/|~/)?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


def is_ros_name(name: str) -> bool:
    """A valid ROS 2 topic/service name (relative, absolute or private ~/), without substitutions.

    >>> [is_ros_name(n) for n in ("stllm/ask", "/stllm/ask", "~/ask", "2d/ask", "a//b", "a b", "")]
    [True, True, True, False, False, False, False]
    """
    return isinstance(name, str) and bool(_NAME.match(name))


def is_frame_id(frame_id: str) -> bool:
    """A tf2 frame id: non-empty, no leading "/" (tf2 refuses it), no whitespace; prefixes such as robot1/map are fine.

    >>> [is_frame_id(f) for f in ("map", "robot1/map", "/map", "my map", "")]
    [True, True, False, False, False]
    """
    return (isinstance(frame_id, str) and bool(frame_id) and not frame_id.startswith("/")
            and not any(c.isspace() for c in frame_id))
