"""Typed dataclasses from plain YAML data: the generic half of ``dopd.config``.

``from_dict(cls, data)`` builds a (nested) dataclass from a mapping, checking each key against the
fields and each value against the type hints; ``read_yaml`` / ``parse_yaml`` read YAML;
``apply_override`` applies one ``key=value`` with a dotted key; ``config_to_dict`` goes back.

Errors are ``ConfigError``s with the full dotted key. A section's ``__post_init__`` names its own
fields (``dtype=...``) and ``from_dict`` prefixes the section's key (``student.dtype=...``), so a
section reads the same whether built from YAML or in Python.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from dopd.errors import ConfigError, quote

BOOLS = (True, False)


def doc(text: str) -> dict[str, str]:
    """Field metadata holding the field's help text (``dopd.config.config_help`` prints it)."""
    return {"help": text}


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` built from a mapping, checking every key and type.

    Nested dataclass fields are built recursively; a field marked ``metadata["rest"]`` collects
    the keys that name no other field. ``prefix`` is the dotted key of ``data`` (for messages).
    """
    if not isinstance(data, Mapping):
        raise _type_error(cls, data, prefix or "config")
    hints = get_type_hints(cls)
    rest = next((f.name for f in fields(cls) if f.metadata.get("rest")), None)
    values: dict[str, Any] = {rest: {}} if rest else {}
    for key, value in data.items():
        if key in hints and key != rest:
            values[key] = convert(hints[key], value, join_key(prefix, key))
        elif rest and isinstance(key, str):
            values[rest][key] = value
        else:
            raise _unknown_key(key, [f.name for f in fields(cls) if f.name != rest], prefix)
    _require_present(cls, values, prefix)
    with _located(prefix):
        return cls(**values)


def convert(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the type ``hint``; ints widen to float, lists become tuples."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, UnionType):
        return _convert_union(hint, args, value, key)
    if origin is Literal:
        return _convert_choice(args, value, key)
    if is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, key)
    if origin is tuple:
        return _convert_tuple(hint, args, value, key)
    if hint is dict or origin is dict:
        return _convert_dict(hint, args, value, key)
    return _convert_scalar(hint, value, key)


def _convert_union(hint: Any, args: tuple, value: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    candidates = [arg for arg in args if arg is not type(None)]
    if len(candidates) == 1:  # X | None: X's own, more precise, error
        return convert(candidates[0], value, key)
    for candidate in candidates:
        try:
            return convert(candidate, value, key)
        except ConfigError:
            continue
    raise _type_error(hint, value, key)


def _convert_choice(choices: tuple, value: Any, key: str) -> Any:
    # Type and value both: True == 1 must not pass for a choice of ints, nor 1 for a bool.
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        options = ", ".join(repr(choice) for choice in choices)
        raise ConfigError(f"{key}={quote(value)} is not allowed; use one of {options}")
    return value


def _convert_tuple(hint: Any, args: tuple, value: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(hint, value, key)
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not variadic and len(value) != len(args):
        raise ConfigError(
            f"{key}={quote(value)} has {len(value)} items; "
            f"expected {len(args)} ({_type_name(hint)})"
        )
    item_hints = [args[0]] * len(value) if variadic else args
    return tuple(
        convert(h, item, f"{key}[{i}]") for i, (h, item) in enumerate(zip(item_hints, value))
    )


def _convert_dict(hint: Any, args: tuple, value: Any, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _type_error(hint, value, key)
    value_hint = args[1] if args else Any
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{key}: key {quote(name)} must be a string; quote it in the YAML")
    return {name: convert(value_hint, item, f"{key}.{name}") for name, item in value.items()}


def _convert_scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and type(value) is int:
        try:
            value = float(value)  # YAML reads "1" as an int; a float field takes it
        except OverflowError:
            raise ConfigError(
                f"{key}: an integer of {value.bit_length()} bits is too large for a float"
            ) from None
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _type_error(hint, value, key)
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite float, got {value!r}")
    if hint is int and not -(2**63) <= value < 2**63:
        raise ConfigError(
            f"{key}: an integer of {value.bit_length()} bits is too large; use a 64-bit integer"
        )
    if hint is str:
        _require_unicode(value, key)
    return value


def _require_unicode(value: str, key: str) -> None:
    """Refuse lone surrogates: a YAML ``"\\ud800"`` escape, or argv bytes that were not UTF-8.

    Such a string cannot be written to a file or used as a path, so it fails here, named, rather
    than in ``save_config`` or ``mkdir``.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(
            f"{key}={quote(value)} holds {quote(value[error.start : error.end])}, which is not "
            "valid UTF-8 text; fix: write the value in UTF-8"
        ) from None


def _require_present(cls: type, values: dict, prefix: str) -> None:
    for f in fields(cls):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            key = join_key(prefix, f.name)
            raise ConfigError(
                f"{key} is required but missing; add it to the config file or pass --set {key}=..."
            )


@contextmanager
def _located(prefix: str) -> Iterator[None]:
    """Prefix the section's dotted key to errors raised by its ``__post_init__``."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        if not prefix or message.startswith(f"{prefix}."):  # the registry names objective.* itself
            raise
        raise ConfigError(f"{prefix}.{message}") from None


def _unknown_key(key: Any, names: list[str], prefix: str) -> ConfigError:
    if not isinstance(key, str):
        return ConfigError(
            f"{prefix or 'config'}: key {quote(key)} must be a string; quote it in the YAML"
        )
    close = difflib.get_close_matches(key, names, n=1)
    hint = (
        f"did you mean {join_key(prefix, close[0])}?"
        if close
        else f"valid keys here: {', '.join(names)}"
    )
    return ConfigError(f"{join_key(prefix, shown_key(key))} is not a config key; {hint}")


def shown_key(key: str) -> str:
    """``key`` as written, or quoted when it would not read back so (blank, spaces, controls)."""
    return key if key and key.isprintable() and key.strip() == key else quote(key)


def _type_error(hint: Any, value: Any, key: str) -> ConfigError:
    fix = _EXAMPLES.get(hint if get_origin(hint) is None else get_origin(hint))
    if is_dataclass(hint):
        fix = f"write it as a section, e.g. {key}: {{{fields(hint)[0].name}: ...}}"
    return ConfigError(
        f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {quote(value)}"
        + (f"; fix: {fix}" if fix else "")
    )


# The fix of a type error, by expected type (YAML spelling).
_EXAMPLES = {
    float: "write a number such as 0.5 or 1e-5",
    int: "write a whole number such as 8",
    bool: "write true or false",
    str: "write text (quote it if YAML would read it as something else)",
    tuple: "write a list such as [a, b]",
    dict: "write a mapping such as {key: value}",
}


def _type_name(hint: Any) -> str:
    if is_dataclass(hint):
        return f"a mapping of {hint.__name__} keys"
    if get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")


def join_key(prefix: str, key: str) -> str:
    """``prefix.key``, or ``key`` at the top level."""
    return f"{prefix}.{key}" if prefix else key


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 booleans and exponent floats.

    PyYAML follows YAML 1.1, where ``no``/``yes``/``on``/``off`` are booleans (so
    ``mixed_precision: no`` would arrive as False) and ``5e-6`` is a string (no dot).
    """


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_FLOAT_PATTERN = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_PATTERN, list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that also quotes strings ``_Loader`` would read as floats (``'1e5'``).

    It keeps YAML 1.1's resolvers too, so ``'no'`` stays quoted for any other YAML reader.
    """


_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_PATTERN, list("-+0123456789"))


def dump_yaml(data: Any) -> str:
    """YAML text of plain ``data`` that ``parse_yaml`` (and ``yaml.safe_load``) read back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def dump_inline(value: Any) -> str:
    """``value`` as one line of YAML that ``parse_yaml`` reads back equal (``null``, ``[a, b]``).

    A string with line breaks becomes a double-quoted JSON string, which is YAML too.
    """
    text = yaml.dump(
        _plain(value), Dumper=_Dumper, default_flow_style=True, width=math.inf, allow_unicode=True
    )
    text = text.removesuffix("\n...\n").removesuffix("\n")
    return json.dumps(_plain(value), ensure_ascii=False) if "\n" in text else text


def read_yaml(path: Path) -> dict:
    """The top-level mapping of the YAML file ``path`` (an empty file: ``{}``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found; check the path given to --config"
        ) from None
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8; fix: re-encode the config file as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot read the config file ({error.strerror or error}); "
            "fix: pass a readable YAML file to --config"
        ) from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config sections, "
            f"got {type(data).__name__} {quote(data)}; fix: write key: value sections "
            "as in configs/tiny.yaml"
        )
    return data


def _line(error: yaml.MarkedYAMLError) -> str:
    """``":N"``, the 1-based line PyYAML marked, or ``""`` when it marked none."""
    mark = error.problem_mark or error.context_mark
    return f":{mark.line + 1}" if mark is not None else ""


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed by ``_Loader``; errors name ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds no arbitrary objects
    except yaml.constructor.ConstructorError as error:
        # e.g. !!python/object/apply:os.system: a safe loader refuses every object-building tag.
        raise ConfigError(
            f"{where}{_line(error)}: invalid YAML: {error.problem}; fix: write plain values "
            "(configs are read with a safe loader, which refuses tags that build Python objects)"
        ) from None
    except yaml.MarkedYAMLError as error:
        raise ConfigError(
            f"{where}{_line(error)}: invalid YAML: {error.problem or error.context}; "
            "fix: correct the YAML there"
        ) from None
    # ValueError: e.g. the date 2024-13-45 or an integer beyond Python's digit limit.
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        detail = " ".join(str(error).split())  # PyYAML's messages span lines; ours take one
        raise ConfigError(f"{where}: invalid YAML ({detail}); fix: correct the YAML") from None


def apply_override(data: dict, override: str) -> None:
    """Set the dotted key of ``override`` (``"optim.lr=1e-5"``) in the nested mapping ``data``."""
    key, sep, raw = override.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(
            f"override {quote(override)} is not key=value with a dotted key; "
            "write e.g. objective.top_k=64"
        )
    key = shown_key(".".join(parts))
    value = parse_yaml(raw, f"override {key}")
    section = data
    for depth, part in enumerate(parts[:-1]):
        if section.get(part) is None:  # an absent or null section: start it
            section[part] = {}
        if not isinstance(section[part], dict):
            parent = shown_key(".".join(parts[: depth + 1]))
            raise ConfigError(
                f"override {key}: {parent}={quote(section[part])} is not a section with keys"
            )
        section = section[part]
    section[parts[-1]] = value


def config_to_dict(config: Any) -> dict:
    """Plain YAML-ready data of a config dataclass (tuples as lists, objective options flat)."""
    data: dict[str, Any] = {}
    for f in fields(config):
        value = _plain(getattr(config, f.name))
        if f.metadata.get("rest"):
            data.update(value)
        else:
            data[f.name] = value
    return data


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
