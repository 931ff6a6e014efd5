"""Every key of a config dataclass, for ``dopd config --list`` and ``config_help``.

``config_keys(TrainConfig)`` walks the dataclass fields (sections expanded, ``X | None`` sections
too) and returns one ``ConfigKey`` per dotted key with its type, default and the help text of its
``doc(...)`` metadata. Nothing is listed by hand, so a section added to ``TrainConfig`` is listed
as soon as it is a field there.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from dopd.config.loading import dump_inline, join_key


@dataclass(frozen=True)
class ConfigKey:
    """One dotted config key.

    Attributes:
        key: dotted path, e.g. ``rollout.vllm_mode`` (``objective.<option>`` for the options).
        type: the accepted values, e.g. ``int``, ``colocate | server``, ``section | null``.
        default: the default as one line of YAML (``null``, ``[0.9, 0.999]``); ``None`` when the
            key is required, when it is a section (its keys carry the defaults) or it has none.
        required: the key must be given (no default).
        help: one line from the field's ``doc(...)`` metadata.
        section: the key is a section whose keys follow it.
    """

    key: str
    type: str
    default: str | None
    required: bool
    help: str
    section: bool = False


def config_keys(cls: type, prefix: str = "") -> list[ConfigKey]:
    """One ``ConfigKey`` per field of the dataclass ``cls``, each section followed by its keys."""
    hints = get_type_hints(cls)
    keys = []
    for f in fields(cls):
        hint = hints[f.name]
        if f.metadata.get("rest"):  # e.g. objective: every other key is an option
            option = join_key(prefix, "<option>")
            keys.append(ConfigKey(option, "per objective", None, False, _help(f)))
            continue
        key = join_key(prefix, f.name)
        nested = next((h for h in (hint, *get_args(hint)) if is_dataclass(h)), None)
        required = f.default is MISSING and f.default_factory is MISSING
        if nested is not None:
            default = dump_inline(f.default) if f.default is not MISSING else None
            kind = "section | null" if NoneType in get_args(hint) else "section"
            keys.append(ConfigKey(key, kind, default, required, _help(f), section=True))
            keys.extend(config_keys(nested, key))
            continue
        keys.append(ConfigKey(key, type_name(hint), _default(f), required, _help(f)))
    return keys


def type_name(hint: Any) -> str:
    """The values ``hint`` accepts, in YAML words: ``int``, ``a | b``, ``str | null``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is NoneType:
        return "null"
    if hint is Any:
        return "any"
    if origin is Literal:
        return " | ".join(dump_inline(arg) for arg in args)
    if origin in (Union, UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{type_name(args[0])}, ...]"
        return f"[{', '.join(type_name(arg) for arg in args)}]"
    if hint is dict or origin is dict:
        return "mapping"
    if hint is list or origin is list:
        return "list"
    return getattr(hint, "__name__", str(hint))


def _default(f: Field) -> str | None:
    if f.default is not MISSING:
        return dump_inline(f.default)
    if f.default_factory is not MISSING:
        return dump_inline(f.default_factory())
    return None


def _help(f: Field) -> str:
    return " ".join(str(f.metadata.get("help", "")).split())


def format_config_keys(keys: list[ConfigKey]) -> str:
    """An aligned table: ``KEY  TYPE = DEFAULT  HELP``, one line per key (``dopd config --list``).

    Columns are separated by at least two spaces; a required key reads ``TYPE, required``.
    """
    rows = [("key", "type = default", "help")]
    for k in keys:
        if k.required:
            value = f"{k.type}, required"
        elif k.default is None:  # a section, or objective.<option>
            value = k.type
        else:
            value = f"{k.type} = {k.default}"
        rows.append((k.key, value, k.help))
    width_key = max(len(row[0]) for row in rows)
    width_value = min(max(len(row[1]) for row in rows), 40)
    return "\n".join(
        f"{key:<{width_key}}  {value:<{width_value}}  {help_}".rstrip()
        for key, value, help_ in rows
    )
