"""Typed, validated configs from YAML: frozen dataclasses built from plain mappings.

Shared by the training job's and the serving app's configs (both depend on spade_core,
never on each other). What it gives a config schema:

* :func:`build` makes a dataclass (nested sections included) from a mapping; unknown keys,
  wrong types and bad literals are ValueErrors naming the full dotted key;
* :func:`check_fields` type-checks a dataclass's fields in its ``__post_init__`` (ints are
  accepted for floats), :func:`require` states a rule with its message;
* :func:`load_yaml` reads a YAML mapping with YAML 1.2 floats (``1e-4``) and no duplicate
  keys; :func:`apply_overrides` applies ``key=value`` overrides checked against the schema.

Pure Python + PyYAML: importing it starts nothing.

Why one small loader of our own and not pydantic (which Ray Serve installs): the model's
architecture (``spade_core.config.ModelConfig``) is saved as config.json beside the weights
and read back by a model library that must stay plain PyTorch, so it stays a frozen dataclass;
pydantic models for the job and serving configs would then mean two systems of rules and
two styles of message for one file's keys (a training YAML holds a ``model:`` section). One
loader reads config.json, the training YAML and the Serve app's args, and every message names
the full dotted key (``model.generator.ngf``) the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import yaml

Builders = Mapping[type, Callable[[Mapping[str, Any], str], Any]]


def load_yaml(text: str) -> dict[str, Any]:
    """A YAML document that must be a mapping (an empty document is ``{}``)."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"the top level must be a mapping of sections, got {kind_of(data)}")
    return data


def dump_yaml_text(data: Mapping[str, Any]) -> str:
    """YAML that :func:`load_yaml` reads back equal (strings like '1e-4' are quoted)."""
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], schema: type) -> dict[str, Any]:
    """A copy of the raw config ``data`` with ``key=value`` overrides applied in order.

    The key is dotted (``model.generator.ngf``) and must exist in ``schema``, even where the
    file leaves it at its default; a missing section is created. The value is parsed as
    YAML (``null``, ``true``, ``1e-4``, ``[1, 2]``, ``{CPU: 0.5}``) and replaces what was
    there: a mapping replaces a whole section rather than merging into it.
    """
    if isinstance(overrides, (str, bytes)):
        raise ValueError(f"overrides must be a list of 'key=value' strings, got the single string {overrides!r}")
    out = copy.deepcopy(dict(data))
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(out, key, value, text, schema)
    return out


def _parse_override(text: Any) -> tuple[str, Any]:
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key == "" or any(part == "" for part in key.split(".")):
        raise ValueError(f"override {text!r} has a malformed key {key!r}; expected a dotted key like optim.lr")
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value {raw!r} is not valid YAML ({exc})") from exc
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any, text: str, root: type) -> None:
    """Set ``tree[a][b][c] = value`` for key ``a.b.c``, checking every part against the schema."""
    parts = key.split(".")
    node, schema, where = tree, root, ""
    for i, part in enumerate(parts):
        here = join_key(where, part)
        last = i == len(parts) - 1
        if schema is None:
            # Inside a free-form mapping field (scaling.resources_per_worker): part is a key of it.
            if not last:
                raise ValueError(f"override {text!r}: {here} is a value, not a section")
            node[part] = value
            return
        hints = type_hints(schema)
        if part not in hints:
            raise ValueError(
                f"override {text!r}: unknown key {here}; {where or 'the top level'} takes {', '.join(hints)}"
            )
        if last:
            node[part] = value
            return
        tp = hints[part]
        sub = section_type(tp)
        if sub is None and not is_mapping_type(tp):
            raise ValueError(f"override {text!r}: {here} is a value, not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {text!r}: {here} is {child!r} in the config, not a mapping")
        node, schema, where = child, sub, here


# PyYAML follows YAML 1.1, where a float needs a dot: '1e-4' would load as a string. This
# adds YAML 1.2's exponent-only form; the dumper knows it too, so it quotes such strings.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                # YAML would keep the last one silently; in a config that hides an edit.
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789"))


def build(cls: type, data: Any, where: str = "", *, builders: Builders | None = None) -> Any:
    """An instance of dataclass ``cls`` from a mapping, nested sections included.

    ``builders`` maps a section type to its own ``(data, where) -> instance`` function, for
    sections that have a reader of their own (e.g. spade_core's ``ModelConfig.from_dict``).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {kind_of(data)}")
    if builders and cls in builders:
        return builders[cls](data, where)
    hints = type_hints(cls)
    reject_unknown(data, hints, where)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = join_key(where, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[f.name]):
                    raise ValueError(f"section {key} is required")
                raise ValueError(f"{key} is required ({describe(hints[f.name])})")
            continue
        kwargs[f.name] = _convert(data[f.name], hints[f.name], key, builders)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(qualify(str(exc), where, getattr(cls, "config_section", None))) from exc


def _convert(value: Any, tp: Any, key: str, builders: Builders | None) -> Any:
    items = list_section_type(tp)
    if items is not None:  # a list of sections: tuple[X, ...] in the schema, a YAML list in the file
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list of mappings, got {kind_of(value)}")
        return tuple(build(items, v, f"{key}[{i}]", builders=builders) for i, v in enumerate(value))
    section = section_type(tp)
    if section is None:
        return typed(value, tp, key)
    if value is None and allows_none(tp):
        return None
    return build(section, value, key, builders=builders)


def check_tree(data: Mapping[str, Any], cls: type, where: str) -> None:
    hints = type_hints(cls)
    reject_unknown(data, hints, where)
    for name, value in data.items():
        tp, key = hints[name], join_key(where, name)
        section = section_type(tp)
        if section is None:
            typed(value, tp, key)
        elif not (value is None and allows_none(tp)) and not isinstance(value, section):
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping, got {kind_of(value)}")
            check_tree(value, section, key)


def qualify(message: str, where: str, section: str | None = None) -> str:
    """Prefix a nested section's own messages ('preprocess.mode ...') with its full key.

    A section names itself by its field name, or by its class's ``config_section`` when
    one class serves several fields (a deployment config under generator, encoder, ...).
    """
    short = section or where.rsplit(".", 1)[-1]
    if not where or short == where:
        return message
    return re.sub(rf"(?<![\w.]){re.escape(short)}\.", f"{where}.", message)


def check_fields(obj: Any, where: str) -> None:
    """Type-check (and int -> float coerce) every field of a frozen dataclass in __post_init__."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = typed(value, hints[f.name], join_key(where, f.name))
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def typed(value: Any, tp: Any, key: str) -> Any:
    """``value`` if it is a ``tp`` (ints accepted and converted for floats), else a ValueError."""
    ok, out = _match(value, tp, key)
    if not ok:
        raise ValueError(f"{key} has a wrong value {value!r}; expected {describe(tp)}")
    return out


def _match(value: Any, tp: Any, key: str) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp), value
    if list_section_type(tp) is not None:
        items = list_section_type(tp)
        return isinstance(value, tuple) and all(isinstance(v, items) for v in value), value
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _match(value, arg, key)
            if ok:
                return True, out
        return False, value
    if origin is dict:
        if not isinstance(value, Mapping):
            return False, value
        key_tp, value_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not _match(k, key_tp, key)[0]:
                raise ValueError(f"{key} has a wrong key {k!r}; expected {describe(key_tp)} keys")
            out[k] = typed(v, value_tp, f"{key}.{k}")
        return True, out
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"{key}: no check for type {tp!r}")  # a schema bug, not a config error


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if list_section_type(tp) is not None:
        return "a list of mappings"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {describe(key_tp)} to {describe(value_tp)}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def reject_unknown(data: Mapping[str, Any], hints: Mapping[str, Any], where: str) -> None:
    unknown = [k for k in data if k not in hints]
    if unknown:
        keys = ", ".join(join_key(where, str(k)) for k in unknown)
        raise ValueError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; {where or 'the top level'} takes {', '.join(hints)}"
        )


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Field name -> type of a dataclass (class variables left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else hints


def section_type(tp: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if len(sections) == 1 else None
    return None


def list_section_type(tp: Any) -> type | None:
    """X for a field of type ``tuple[X, ...]`` where X is a dataclass, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def is_mapping_type(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(is_mapping_type(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is dict


def allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def join_key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)

