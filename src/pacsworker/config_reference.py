"""The configuration reference (``docs/configuration.md``), generated from the settings model.

Every key of :class:`pacsworker.config.Settings` is listed with its type, default, environment
variable and description, section by section: nested sections, the items of lists of sections
(``models[]``) and each kind of a discriminated union (``destinations[]``). Regenerate with::

    .venv/bin/python -m pacsworker.config_reference > docs/configuration.md

``tests/test_docs.py`` fails when the file differs from what this prints.
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import Settings

REGENERATE = ".venv/bin/python -m pacsworker.config_reference > docs/configuration.md"
ENV_PREFIX = Settings.model_config["env_prefix"]
_delimiter = Settings.model_config["env_nested_delimiter"]
if _delimiter is None:
    raise RuntimeError("Settings.model_config must set env_nested_delimiter")
ENV_DELIMITER: str = _delimiter
SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "path", Any: "any value"}


@dataclass
class Key:
    """One row of the reference: a settable key."""

    path: str
    type: str
    default: str
    env: str
    description: str


@dataclass
class Section:
    """The keys of one settings class, at one place in the tree."""

    path: str
    title: str
    doc: str
    keys: list[Key] = field(default_factory=list)


def _strip(annotation: Any) -> tuple[Any, list[Any]]:
    """The annotation without ``Annotated``, and the metadata that wrapped it."""
    metadata: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += extra
    return annotation, metadata


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (``X | None`` included, nested unions flattened), else the annotation."""
    annotation, _ = _strip(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _discriminator(annotation: Any) -> str | None:
    """The field that tells the kinds of a (possibly optional) discriminated union apart."""
    annotation, metadata = _strip(annotation)
    for item in metadata:
        if isinstance(item, FieldInfo) and isinstance(item.discriminator, str):
            return item.discriminator
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return next(filter(None, (_discriminator(arg) for arg in typing.get_args(annotation))), None)
    return None


def _is_section(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _number(value: object) -> str:
    """A number as written in YAML, with its size in MiB or GiB when it is a whole number of them."""
    text = str(value)
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        text += f" ({value >> 30} GiB)" if value % (1 << 30) == 0 else f" ({value >> 20} MiB)"
    return text


def _constraints(metadata: list[Any]) -> list[str]:
    found = []
    lengths: dict[str, int] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found += _constraints(item.metadata)
        elif isinstance(item, annotated_types.Ge):
            found.append(f">= {_number(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            found.append(f"> {_number(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            found.append(f"<= {_number(item.le)}")
        elif isinstance(item, annotated_types.Lt):
            found.append(f"< {_number(item.lt)}")
        elif isinstance(item, annotated_types.MinLen):
            lengths["min"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            lengths["max"] = item.max_length
        elif getattr(item, "pattern", None):
            found.append(f"matching `{item.pattern}`")
    if lengths.get("min") and lengths.get("min") == lengths.get("max"):
        found.append(f"exactly {lengths['min']} long")
    else:
        found += [f"at least {lengths['min']} long"] if lengths.get("min") else []
        found += [f"at most {lengths['max']} long"] if "max" in lengths else []
    return found


def describe_type(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A reader's name for a type: ``integer, >= 1``, ``list of string``, ``one of `a`, `b```."""
    annotation, inner = _strip(annotation)
    constraints = [*metadata, *inner]
    members = _members(annotation)
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    if len(members) > 1:
        text = " or ".join(describe_type(m) for m in members)
    else:
        annotation, inner = _strip(members[0])
        constraints += inner
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is Literal:
            text = "one of " + ", ".join(f"`{a}`" for a in args)
        elif origin in (list, tuple, set):
            text = f"list of {describe_type(args[0]) if args else 'any value'}"
        elif origin is dict:
            text = f"mapping of {describe_type(args[0])} to {describe_type(args[1])}"
        elif _is_section(annotation):
            tag = typing.get_args(annotation.model_fields["kind"].annotation) if "kind" in annotation.model_fields else ()
            text = f"section (kind: {tag[0]})" if len(tag) == 1 else "section"
        elif inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
            text = "one of " + ", ".join(f"`{m.value}`" for m in annotation)
        else:
            text = SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    limits = _constraints(constraints)
    text = f"{text}, {', '.join(limits)}" if limits else text
    return f"{text}, or null" if optional else text


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, Path):
        return str(value) if value.is_absolute() or str(value).startswith(".") else f"./{value}"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_default(info: FieldInfo) -> str:
    """The default as YAML would spell it; a named factory function is described by its docstring."""
    if info.default_factory is not None:
        factory = info.default_factory
        if inspect.isfunction(factory) and factory.__name__ != "<lambda>":
            doc = (inspect.getdoc(factory) or factory.__name__).split("\n\n")[0]
            return " ".join(doc.replace("``", "`").split())
        value = info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            return "(section below)"
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    value = _plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return _number(value)
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    if value == "":
        return '""'
    return str(value)


def _doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].replace("``", "`").split()) if doc else ""


def _env_name(env_path: list[str] | None) -> str:
    if env_path is None:
        return ""
    return ENV_PREFIX + ENV_DELIMITER.join(part.upper() for part in env_path)


def _kinds(alternatives: Any, path: str, title: str, env: list[str] | None, context: str) -> list[tuple]:
    """The sections that can stand at ``path``: one, or each kind of a discriminated union."""
    kinds = [m for m in _members(alternatives) if _is_section(m)]
    discriminator = _discriminator(alternatives)
    if discriminator and len(kinds) > 1:
        common = _common_base(kinds)
        found: list[tuple] = [(common, path, f"{title} (every {discriminator})", env, None)] if common else []
        for kind in kinds:
            value = typing.get_args(kind.model_fields[discriminator].annotation)[0]
            found.append((kind, path, f"{title} ({discriminator}: {value})", env, (discriminator, value)))
        return found
    return [(kind, path, title + context, env, None) for kind in kinds]


def _common_base(kinds: list[type]) -> type[BaseModel] | None:
    """The settings class every kind extends (models: the keys all kinds share), None if only BaseModel."""
    for base in kinds[0].__mro__[1:]:
        if base is BaseModel or not _is_section(base):
            return None
        if all(issubclass(kind, base) for kind in kinds):
            return base
    return None


def walk(cls: type[BaseModel], path: str, title: str, env_path: list[str] | None, out: list[Section],
         tag: tuple[str, str] | None = None, context: str = "") -> None:
    """Append the section of ``cls`` at ``path`` and, depth first, the sections it contains.

    ``env_path`` is the chain of names an environment variable spells for this section, or None
    inside list items and mappings, which the environment can only set whole (as JSON). ``tag``
    is (field, value) when ``cls`` is one kind of a discriminated union; ``context`` names the
    nearest such kind above, which the titles of the sections below it repeat.
    """
    section = Section(path, title, _doc(cls))
    out.append(section)
    context = f" ({tag[0]}: {tag[1]})" if tag else context
    below: list[tuple] = []
    shared = _common_base([cls]) if tag else None  # a kind lists only its own keys; the shared ones come once
    for name, info in cls.model_fields.items():
        if shared is not None and tag and name in shared.model_fields and name != tag[0]:
            continue
        key = info.alias or name
        dotted = f"{path}.{key}" if path else key
        own_env = None if env_path is None else [*env_path, name]
        annotation, _ = _strip(info.annotation)
        members = [m for m in _members(annotation) if m is not type(None)]
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        description = " ".join((info.description or "").split())
        if not description and tag and name == tag[0]:
            description = f"`{tag[1]}` selects this kind"
        env = _env_name(own_env)
        children = len(below)
        sections = [m for m in members if _is_section(m)]
        if sections and len(members) == len(sections) == 1:
            below.append((sections[0], dotted, dotted + context, own_env, None))
            kind = "section, or null" if type(None) in _members(annotation) else "section"
            section.keys.append(Key(dotted, kind, describe_default(info), env and env + ENV_DELIMITER + "...",
                                    description or f"see `{dotted + context}` below"))
            continue
        if sections:  # kinds of a section, or a section or a plain value (pipeline: inline, or a file name)
            inline = "" if len(members) == len(sections) else " (inline)"
            # a required union keeps its discriminator on the field, not in the annotation
            tagged = Annotated[annotation, info] if isinstance(info.discriminator, str) else annotation
            below += _kinds(tagged, dotted, dotted + inline, own_env, context)
        elif origin in (list, dict) and args:
            suffix = "[]" if origin is list else ".<key>"
            below += _kinds(args[-1], dotted + suffix, dotted + suffix, None, context)
        if not description and len(below) > children:
            description = f"see `{below[children][2]}` below"
        if env and sections and origin not in (list, dict):  # kinds of a section: set key by key, like a section
            env = env + ENV_DELIMITER + "..."
        elif env and (origin in (list, dict) or sections):
            env = f"{env} (JSON)"
        section.keys.append(Key(dotted, describe_type(info.annotation, info.metadata), describe_default(info), env,
                                description))
    for child, child_path, child_title, child_env, child_tag in below:
        walk(child, child_path, child_title, child_env, out, child_tag, context)


def sections() -> list[Section]:
    out: list[Section] = []
    walk(Settings, "", "top level", [], out)
    return out


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and ``<name>`` outside code spans kept from being read as HTML."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    parts[::2] = [re.sub(r"<(?=[A-Za-z/!])", "&lt;", part) for part in parts[::2]]
    return "`".join(parts) or " "


def render() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- generated from pacsworker.config.Settings; do not edit: run `{REGENERATE}` -->",
        "",
        ("One YAML file (`--config FILE` on every command, or the environment variable `PACSWORKER_CONFIG`)."
         f" Every key outside lists can also be set by an environment variable, `{ENV_PREFIX}` followed by the"
         f" key's path in upper case with `{ENV_DELIMITER}` between its parts, which wins over the file"
         " (for example `PACSWORKER__SCP__PORT=104`). Lists and mappings are given as JSON"
         " (`PACSWORKER__SCP__ALLOWED_CALLING_AETS='[\"CT1\", \"PACS\"]'`); the items of `models` and"
         " `destinations` can only be set as a whole list. Invalid values stop start-up with the key,"
         " what was expected and what was given; an unknown key, in the file or in a `PACSWORKER__` variable,"
         " stops it too, naming the key, where it is and the nearest valid name (a key of another kind of"
         " model: which kinds take it). Each kind of model has the keys of `models[] (every kind)` and its own."),
        "",
        ("Types: `integer`, `number` (integer or decimal), `boolean` (`true`/`false`), `string`, `path`"
         " (relative paths are taken from the working directory); `null` is YAML's empty value."),
        "",
    ]
    for section in sections():
        if section.path:
            lines += [f"## `{section.title}`", ""]
        else:
            lines += ["## Top level", ""]
        if section.doc:
            lines += [section.doc, ""]
        lines += ["| key | type | default | environment | description |", "|---|---|---|---|---|"]
        for key in section.keys:
            name, _, note = key.env.partition(" ")
            env = f"`{name}` {note}".strip() if key.env else "(in the list's JSON)"
            lines.append(f"| `{key.path}` | {_cell(key.type)} | {_cell(key.default)} | {_cell(env)} | "
                         f"{_cell(key.description)} |")
        lines.append("")
    return "\n".join(lines)


def undescribed() -> list[str]:
    """Dotted keys that have no description (the reference would show an empty cell)."""
    return [key.path for section in sections() for key in section.keys if not key.description]


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
