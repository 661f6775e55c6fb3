"""ROS parameters declared from a stllm_core dataclass config: one parameter per field (nested dataclasses become
dotted names), the field's default, a description, and validation of runtime updates through the dataclass itself."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

from stllm_core.errors import STLLMError


def _flatten(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(_flatten(t, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, f, t))
    return out


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the dataclass's source: the parameter's description."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", src, re.M)}


def describe(cls: type, prefix: str = "", help: dict[str, str] | None = None) -> list[tuple[str, Any, str]]:
    """(name, default, description) of every parameter declared for `cls`."""
    rows = []
    for name, f, _t in _flatten(cls):
        owner = _owner(cls, name)
        desc = (help or {}).get(name) or field_comments(owner).get(name.rsplit(".", 1)[-1], "")
        rows.append((prefix + name, _ros_value(_default(f)), desc))
    return rows


def _owner(cls: type, dotted: str) -> type:
    hints = typing.get_type_hints(cls)
    head, _, rest = dotted.partition(".")
    return _owner(hints[head], rest) if rest else cls


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _ros_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def declare_config(node: Node, cls: type, prefix: str = "", help: dict[str, str] | None = None) -> list[str]:
    """Declare every field of `cls` as a parameter `<prefix><field>`; returns the parameter names."""
    names = []
    for name, default, desc in describe(cls, prefix, help):
        if isinstance(default, list) and not default:
            # an empty list has no ROS type; declare it as a string array
            node.declare_parameter(name, Parameter.Type.STRING_ARRAY, ParameterDescriptor(description=desc))
        else:
            node.declare_parameter(name, default, ParameterDescriptor(description=desc))
        names.append(name)
    return names


def markdown_table() -> str:
    """The README's parameter table for stllm_reasoner (python -m stllm_ros.params)."""
    from stllm_core.reasoning.config import HELP, ReasonerConfig
    from stllm_ros.perception import PerceptionConfig

    rows = [("autostart", True, "configure and activate at start (load the model, start perception, serve)")]
    rows += describe(ReasonerConfig, help=HELP) + describe(PerceptionConfig, prefix="perception.")
    lines = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, default, desc in rows:
        lines.append(f"| `{name}` | `{default!r}` | {desc.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, values, key + ".")
        elif key in values and values[key] is not None:
            v = values[key]
            default = _default(f)
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if isinstance(default, tuple) and isinstance(v, list | tuple):
                v = tuple(v)
            kwargs[f.name] = v
    return cls(**kwargs)


def read_config(node: Node, cls: type, prefix: str = "", overrides: dict[str, Any] | None = None) -> Any:
    """Build the dataclass from the node's current parameters (+ overrides); raises the dataclass's ConfigError."""
    values = {}
    for name, _f, _t in _flatten(cls):
        values[prefix + name] = node.get_parameter(prefix + name).value
    values.update(overrides or {})
    return _build(cls, values, prefix)


def guard_config(node: Node, cls: type, prefix: str = "") -> None:
    """Reject parameter updates that the dataclass would refuse, with its message as the reason."""
    names = {prefix + n for n, _f, _t in _flatten(cls)}

    def on_set(params: list[Parameter]) -> SetParametersResult:
        mine = {p.name: p.value for p in params if p.name in names}
        if not mine:
            return SetParametersResult(successful=True)
        try:
            read_config(node, cls, prefix, mine)
        except (STLLMError, TypeError, ValueError) as e:
            return SetParametersResult(successful=False, reason=str(e))
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)
