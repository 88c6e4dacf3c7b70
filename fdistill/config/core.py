"""Typed configs: dataclass schemas, YAML files merged over their defaults, dotted overrides.

The DINOv2 pattern (defaults <- YAML file(s) <- command-line ``key=value``), with torchtune-style
validation: every key and value is checked against the schema *before any compute*; an unknown
key is an error that suggests the closest valid one, a wrong type names the field and the type.

    cfg = build_config(DistillConfig, "configs/distill/tiny_cpu.yaml", ["optim.lr=1e-3"])

A YAML file may start from others with ``_base_: [other.yaml, ...]`` (paths relative to it).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Type, TypeVar, Union, get_args, get_origin

import yaml

from ..errors import ConfigError  # the one hierarchy: fdistill.errors

T = TypeVar("T")

__all__ = ["ConfigError", "build_config", "from_dict", "to_dict", "load_yaml", "parse_overrides",
           "merge", "save_yaml", "diff_configs"]




# -- dict helpers ----------------------------------------------------------------------------------
def merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """Deep merge: nested dicts merge, anything else in ``override`` replaces."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | os.PathLike, _seen: Optional[set] = None) -> Dict[str, Any]:
    """Read a YAML config, resolving ``_base_`` (a path or a list, relative to the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    _seen = set() if _seen is None else _seen
    if p.resolve() in _seen:
        raise ConfigError(f"config _base_ cycle at {p}")
    _seen.add(p.resolve())
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: Dict[str, Any] = {}
    for b in bases:
        merged = merge(merged, load_yaml(p.parent / b, _seen))
    return merge(merged, data)


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["optim.lr=1e-3", "data.path=/x"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


# -- dataclass <-> dict ------------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """A config dataclass (or nested values) -> plain dicts/lists/scalars (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float, numeric
    strings like '1e-3' - which YAML 1.1 reads as strings - converted for float fields)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # Optional[X]: X's own message says what is wrong
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (list, List, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        vals = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan pass YAML and every "> 0" check, then ruin a run
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _nested_default(f: dataclasses.Field, tp: Any) -> Any:
    """The default instance of a dataclass-typed field (``default`` or ``default_factory``), else None."""
    if not dataclasses.is_dataclass(tp):
        return None
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is not dataclasses.MISSING and dataclasses.is_dataclass(f.default):
        return f.default
    return None


def from_dict(cls: Type[T], data: Dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) dict, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            full = f"{where}.{key}" if where else str(key)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name in data:
            value = data[name]
            default = _nested_default(fields[name], hints[name])
            if default is not None and isinstance(value, dict):
                # a partial mapping for a nested section refines *this* schema's default for it
                # (e.g. LinprobeConfig's data.batch_size=16384), not the section class's own defaults
                value = merge(to_dict(default), value)
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def build_config(cls: Type[T], path: Optional[str | os.PathLike] = None,
                 overrides: Iterable[str] | Dict[str, Any] = ()) -> T:
    """Defaults of ``cls`` <- YAML file ``path`` <- overrides (``"a.b=v"`` strings or a dict)."""
    data: Dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = merge(data, ov)
    # validate the partial dict against the schema: fields absent keep their defaults
    return from_dict(cls, data)


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a config (dataclass or dict) as YAML, atomically."""
    from ..io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def diff_configs(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two config dicts (for checkpoint compatibility)."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} != {vb!r}")
    return out
