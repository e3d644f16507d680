"""YAML run configs as typed dataclasses, with dotted ``key=value`` overrides.

Each command declares its config as nested dataclasses, each field documented by the
docstring under it. This module reads YAML into them, applies overrides such as
``train.max_steps=200`` with the type the field declares, rejects unknown keys with the
list of valid ones, and prints every key with its documentation and default for
``neobert <command> --help`` (:func:`command_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neobert.errors import UserError

T = TypeVar("T")


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check/convert one YAML value to the declared type; raise UserError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: {key}={value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {key} must be a list, got {value!r}")
        (arg, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(v, arg, key, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 6e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            valid = ", ".join(_valid_keys(cls, prefix))
            raise UserError(f"{where}: unknown key '{prefix}{key}'; valid keys: {valid}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: '{p}' is not a section")
        node = child
    node[last] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read ``path`` (YAML) into ``cls`` and apply ``key=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise UserError(f"config {path} is a directory, not a YAML file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"config {path} is not a text (UTF-8) file: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return from_dict(cls, data, where)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]`` -> (config path or None, overrides)."""
    path = None
    overrides = []
    for a in argv:
        if "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise UserError(f"unexpected argument {a!r}: expected one CONFIG.yaml and key=value overrides")
    return path, overrides


def command_config(cls: type[T], argv: list[str], prog: str, summary: str) -> T:
    """The config of a command called as ``prog [CONFIG.yaml] [key=value ...]``.

    ``-h`` / ``--help`` prints ``summary`` and every key with its default and documentation,
    then exits (status 0), as argparse does.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [CONFIG.yaml] [key=value ...]\n\n{summary.strip()}\n\nkeys (YAML sections, or key=value overrides):")
        print(describe(cls))
        raise SystemExit(0)
    path, overrides = split_args(argv)
    return load_config(cls, path, overrides)


def describe(cls: type, prefix: str = "") -> str:
    """Every key of dataclass ``cls`` as ``key = default`` and its docstring, indented."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(describe(hints[f.name], f"{prefix}{f.name}."))
            continue
        lines.append(f"  {prefix}{f.name} = {yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True).strip().removesuffix('...').strip()}")
        lines += [f"      {line}" for line in docs.get(f.name, "").splitlines()]
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and of its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs
