"""The one place where YAML becomes configuration.

Every command that takes ``--config FILE`` turns the YAML mapping into a frozen
dataclass here, then applies command-line overrides (options left at ``None``
do not override). Unknown keys, wrong types and malformed files are errors that
name the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import click
import yaml

T = TypeVar("T")


class ConfigError(click.UsageError):
    """A configuration file or override is invalid."""


class GuidanceParam(click.ParamType):
    """``--guidance 2`` (every stage) or ``--guidance 2,2,1`` (prior, inpaint, refine)."""

    name = "W|W_PRIOR,W_INPAINT,W_REFINE"

    def convert(self, value, param, ctx):
        from reid_aug.synthesis import parse_guidance

        if not isinstance(value, str):
            return value
        try:
            return parse_guidance(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors[arg] = exc
        # A list given where one alternative is a list: that alternative's error says what is wrong with it.
        alike = [arg for arg in errors if _shape(arg) == _shape(type(value)) != "scalar"]
        if len(alike) == 1:
            others = [_describe(arg) for arg in errors if arg is not alike[0]]
            raise ConfigError(f"{errors[alike[0]]}" + (f" (or {' or '.join(others)})" if others else ""))
        wanted = " or ".join([_describe(arg) for arg in errors] + (["null"] if type(None) in args else []))
        raise ConfigError(f"{where}: expected {wanted}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {list(value)!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    return value


def _shape(tp: Any) -> str:
    """"list", "mapping" or "scalar": the YAML shape of values of type ``tp``."""
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and issubclass(origin, (list, tuple)):
        return "list"
    if dataclasses.is_dataclass(tp) or isinstance(origin, type) and issubclass(origin, Mapping):
        return "mapping"
    return "scalar"


def _describe(tp: Any) -> str:
    """``tp`` in the words of the errors above ("a number", "a list of 3 items", ...)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(args)}"
    if _shape(tp) == "list":
        fixed = typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis
        return f"a list of {len(args)} items" if fixed else "a list"
    if _shape(tp) == "mapping":
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # at the top level these come from options: say which
        raise ConfigError(f"{where + ': ' if where else ''}missing "
                          + ", ".join(f"option '--{m.replace('_', '-')}' (or `{m}:` in --config)" if not where
                                      else f"key `{m}`" for m in missing))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the dataclass's own __post_init__ validation
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Build frozen dataclass ``cls`` from YAML file ``path`` and command-line ``overrides``.

    ``section`` selects a sub-mapping of the file (e.g. ``bot`` in an experiment file).
    Overrides whose value is ``None`` are ignored, so click options default to ``None``.
    Nested fields are overridden with dotted keys (``"optim.lr"``).
    """
    data: dict[str, Any] = {}
    label = cls.__name__
    if path is not None:
        data = read_yaml(Path(path))
        label = str(path)
        if section is not None:
            sub = data.get(section, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            data = dict(sub)
            label = f"{path}:{section}"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    try:
        return _build(cls, data, "")
    except ConfigError as exc:  # a file is named; options alone need no prefix
        raise ConfigError(f"{label}: {exc}" if path is not None else str(exc)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen config as plain YAML/JSON-ready data (paths as strings), for manifests."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def normalize_record(cls: type[T]):
    """``record -> record``: a stored config record rebuilt as ``cls`` with today's defaults, for comparing
    a manifest written before a key was added with the config of now."""

    def normalize(record: dict) -> dict:
        try:
            return config_to_dict(_build(cls, record, ""))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    return normalize
