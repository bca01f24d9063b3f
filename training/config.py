"""The configuration engine: typed sections set from YAML and the command line, checked by type.

A configuration is a dataclass whose fields are sections, each a dataclass of typed fields.
Values come from the defaults, then a YAML preset, then ``--section.field VALUE`` on the
command line (read as YAML, so ``--optim.lr 1e-3`` and ``--data.resolution '{kind: ramp}'``
both work). A wrong name gets a did-you-mean, a wrong type a message naming the field.

A field declared with :func:`neutral` never changes what training computes (paths, logging,
evaluation cadence): :func:`result_fields` leaves it out, so a resumed run may change it.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

NEUTRAL = {"result_neutral": True}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def setting(default: Any = dataclasses.MISSING, bounds: str | None = None, *, note: str = "",
            neutral: bool = False, **kwargs: Any) -> Any:
    """A config field declared with its bounds, checked by :func:`check_settings`: ``">= 1"``,
    ``"> 0"``, ``"[0, 1)"`` (None always passes). ``neutral``: it never changes the result."""
    if bounds is not None:
        _bounds(bounds)  # a typo in a declaration fails at import
    metadata = {"bounds": bounds, "note": note, "result_neutral": neutral}
    return field(default=default, metadata=metadata, **kwargs)


def neutral(default: Any = dataclasses.MISSING, bounds: str | None = None, **kwargs: Any) -> Any:
    """A :func:`setting` that never changes the training result."""
    return setting(default, bounds, neutral=True, **kwargs)


_INTERVAL = re.compile(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])")


def _bounds(text: str) -> Callable[[float], bool]:
    if m := re.fullmatch(r"(>=|>)\s*(\S+)", text):
        low = float(m.group(2))
        return (lambda v: v >= low) if m.group(1) == ">=" else (lambda v: v > low)
    if m := _INTERVAL.fullmatch(text):
        lo, hi = float(m.group(2)), float(m.group(3))
        return lambda v: (lo <= v if m.group(1) == "[" else lo < v) and (
            v <= hi if m.group(4) == "]" else v < hi)
    raise ValueError(f"bounds {text!r}: write '>= x', '> x' or an interval like '[0, 1)'")


def check_settings(cfg: Any) -> None:
    """Every declared bound of every field of ``cfg``'s sections; the message names the field."""
    for section in sections(cfg):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            bounds, value = f.metadata.get("bounds"), getattr(obj, f.name)
            if bounds and value is not None and not _bounds(bounds)(value):
                what = f"must be {bounds}" if bounds[0] in "<>" else f"must lie in {bounds}"
                note = f.metadata.get("note")
                raise ConfigError(f"{section}.{f.name}: {what}" + (f" ({note})" if note else ""))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML as plain data (the safe loader: no Python objects), exponent floats included."""
    return yaml.load(text, Loader=_Loader)


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean a, b?"`` for close matches, else an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` if it fits (ints and float strings for floats), else raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: X's own message
            return check_type(key, value, options[0])
        for option in options:
            try:
                return check_type(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_hint_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected None")
        return value
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a valid float") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    sequence = origin or hint
    if sequence in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        item = args[0] if args else Any
        items = [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if sequence is tuple else items
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool) or not isinstance(value, hint):
            raise ConfigError(f"{key}: {value!r} is not a valid {_hint_name(hint)}")
    return value


def sections(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def set_field(cfg: Any, key: str, value: Any) -> None:
    """Set ``section.name`` in ``cfg``, checked against the field's type."""
    section, _, name = key.partition(".")
    if section not in sections(cfg):
        raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {sections(cfg)}")
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ConfigError(f"unknown config field {key!r}"
                          + (suggest(key, [f"{section}.{n}" for n in names])
                             or f"; {section} has {names}"))
    setattr(obj, name, check_type(key, value, typing.get_type_hints(type(obj))[name]))


def flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    """``{section: {name: value}}`` -> ``{"section.name": value}``."""
    out = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        out.update({f"{section}.{name}": value for name, value in values.items()})
    return out


def to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """Plain data (lists, not tuples), as saved in config.yaml and in checkpoints."""
    return {s: _plain(dataclasses.asdict(getattr(cfg, s))) for s in sections(cfg)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse(cfg: Any, argv: list[str] | None, aliases: dict[str, str], description: str,
          epilog: str = "", flags: dict[str, str] | None = None) -> Any:
    """Fill ``cfg`` (an instance with default sections): YAML file (``--config``) < command line.
    ``aliases`` map short options to fields; ``flags`` map value-less options to bool fields."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/)")
    for flag, key in aliases.items():
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"= --{key}")
    for flag, key in (flags or {}).items():
        parser.add_argument(flag, dest=key, action="store_const", const=True,
                            default=argparse.SUPPRESS, help=f"= --{key} true")
    for section in sections(cfg):
        for f in dataclasses.fields(getattr(cfg, section)):
            parser.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}",
                                default=argparse.SUPPRESS, metavar="VALUE")
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        key = flag[2:].split("=")[0]
        if "." in key:
            set_field(cfg, key, None)  # raises: unknown section or field, with suggestions
        raise ConfigError(f"unrecognised argument {flag!r}"
                          + suggest(flag, ["--config", *aliases, *(flags or {})]))
    values = vars(known)
    preset = values.pop("config", None)
    if preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
        for key, value in flatten(tree, str(path)).items():
            set_field(cfg, key, value)
    for key, raw in values.items():
        try:
            value = load_yaml(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        set_field(cfg, key, value)
    return cfg


def result_fields(cfg_dict: dict[str, dict[str, Any]], cfg_type: type, unused: set[str]) -> dict[str, Any]:
    """The flattened fields of a saved config that change the result: sections in ``unused``
    and fields declared :func:`neutral` in ``cfg_type`` are left out."""
    hints = typing.get_type_hints(cfg_type)
    out = {}
    for section, values in cfg_dict.items():
        if section in unused:
            continue
        section_type = hints.get(section)
        neutral_names = {f.name for f in dataclasses.fields(section_type)
                         if f.metadata.get("result_neutral")} if section_type else set()
        out.update({f"{section}.{k}": v for k, v in values.items() if k not in neutral_names})
    return out


def dataclass_from_signature(name: str, fn: Callable, skip: tuple[str, ...]) -> type:
    """A dataclass of ``fn``'s keyword parameters with their defaults and hints (one source)."""
    hints = typing.get_type_hints(fn)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", *skip) or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        default = p.default
        spec = (field(default_factory=lambda d=default: type(d)(d))
                if isinstance(default, (list, dict, set)) else field(default=default))
        fields.append((p.name, hints.get(p.name, Any), spec))
    return dataclasses.make_dataclass(name, fields)
