"""Typed configuration tables and on-disk records: the pydantic bases, the one error formatter, TOML in and out.

* :class:`Table` — one TOML table (``[train]``, ``[prepare]``, ``[federation]``,
  ``[study]``): frozen, an unknown key is an error (a typo must not fall back
  to a default), ``replace`` validates again;
* :class:`Record` — one JSON record on disk (``model.json``, ``state.json``,
  ...): frozen, one reader and one writer (strict JSON, atomic: :mod:`fedseg.io`),
  keys added by later versions get defaults, keys it does not know are kept;
* :func:`explain` — a pydantic ``ValidationError`` as fedseg's one-line
  message naming the file, the table, the key and what is allowed, e.g.
  ``study.toml: train.lr_patience must be an integer >= 0, got -1``;
* :func:`read_toml` / :func:`write_toml` — TOML files (``tomllib`` / ``tomli-w``).

Messages name a key as ``table.key`` and a table by its TOML header too
(``[train.augment]``); the CLI escapes them for rich, which would take
``[train]`` for markup.
"""

from __future__ import annotations

import math
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

import annotated_types
import tomli_w
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    ValidationError,
    WrapValidator,
    model_serializer,
)
from pydantic.fields import FieldInfo

from fedseg.errors import FedsegError
from fedseg.io import dumps_json, loads_json, read_json, write_json, write_text

__all__ = [
    "Bool", "Integer", "Number", "Record", "Table", "Text", "explain", "must_be", "read_toml", "toml_text", "write_toml",
]

_SAYS = "fedseg_requirement"


def must_be(text: str) -> Any:
    """A field's requirement in words, for :func:`explain` (``Annotated[int, Field(ge=3), must_be("...")]``)."""
    return Field(json_schema_extra={_SAYS: text})


def _as_written(value: Any, handler: Any) -> Any:
    # an integer stays one: cache keys hash the JSON of a config, and "4" must not become "4.0"
    return value if type(value) is int else handler(value)


Integer = Annotated[int, Strict()]
"""An integer as TOML writes one: ``3.0``, ``"3"`` and ``true`` are refused."""
Number = Annotated[float, Strict(), AllowInfNan(False), WrapValidator(_as_written)]
"""A finite number, integer or float, kept as written."""
Bool = StrictBool
Text = StrictStr


# ----------------------------------------------------------------- the bases


class _Explained(type(BaseModel)):  # type: ignore[misc]  # pydantic's metaclass
    """``TrainConfig(epochs=0)`` raises the table's FedsegError, not pydantic's error.

    On the class call, not in ``__init__``: pydantic runs a custom ``__init__``
    for every nested table too, which would stop it collecting the others' problems.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(cls.positional):
            raise TypeError(f"{cls.__name__} takes at most {len(cls.positional)} positional arguments")
        try:
            return super().__call__(**dict(zip(cls.positional, args)), **kwargs)
        except ValidationError as exc:
            raise cls.error(explain(exc, cls)) from None


class Table(BaseModel, metaclass=_Explained):
    """One TOML table. Subclasses set :attr:`toml_table` (its name in a file) and may set :attr:`error`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    toml_table: ClassVar[str] = ""
    error: ClassVar[type[FedsegError]] = FedsegError
    entries: ClassVar[str] = "key"  # what its keys are called in messages ("table" for a whole file)
    positional: ClassVar[tuple[str, ...]] = ()  # fields that may also be given by position

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Self:
        """Validate a plain dict (a TOML table, a JSON record of one); ``source`` names where it came from."""
        try:
            return cls.model_validate(dict(data) if isinstance(data, Mapping) else data)
        except ValidationError as exc:
            raise cls.error(explain(exc, cls, source)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like any other (``model_copy`` would not)."""
        return type(self).from_dict({**dict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (tuples as lists), so it compares equal to what a record stores."""
        return loads_json(dumps_json(self.model_dump()))


class Record(BaseModel):
    """One JSON record on disk. Fields in :attr:`optional_keys` are written only when they differ from
    their default (as fedseg always wrote them), so files keep their shape."""

    model_config = ConfigDict(extra="allow", frozen=True)
    optional_keys: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_defaults(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in self.optional_keys:
            if name in data and data[name] == type(self).model_fields[name].default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "record") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise FedsegError(explain(exc, cls, source)) from None

    @classmethod
    def read(cls, path: Path) -> Self:
        """The record in ``path``; unreadable or malformed → FedsegError naming the file and the field."""
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (tuples as lists): what :meth:`write` puts in the file."""
        return loads_json(dumps_json(self.model_dump()))

    def write(self, path: Path) -> None:
        """Strict JSON, atomically (non-finite floats tagged, see :mod:`fedseg.io`)."""
        write_json(path, self.to_dict())


# ----------------------------------------------------------------- messages


def explain(error: ValidationError, model: type[BaseModel], source: str | None = None) -> str:
    """One line in fedseg's style for every problem ``error`` found in a ``model`` (a Table or Record).

    Unknown keys are gathered per table: ``unknown option(s) in the train table ['epoch', 'lr']; [train] takes ...``.
    """
    table = getattr(model, "toml_table", "")
    unknown: dict[str, tuple[type[BaseModel], list[str]]] = {}  # table -> (its model, the keys it does not have)
    other: list[str] = []
    for problem in error.errors(include_url=False):
        owner, field, path, inside = _locate(model, tuple(problem["loc"]), table)
        if problem["type"] == "extra_forbidden":
            unknown.setdefault(path.rpartition(".")[0], (owner, []))[1].append(str(problem["loc"][-1]))
        else:
            other.append(_explain_one(problem, field, path, table, inside))
    lines = [_unknown_keys(parent, owner, keys) for parent, (owner, keys) in unknown.items()] + other
    return (f"{source}: " if source else "") + "; ".join(dict.fromkeys(lines))


def _unknown_keys(parent: str, owner: type[BaseModel], keys: list[str]) -> str:
    known = ", ".join(owner.model_fields)
    if getattr(owner, "entries", "key") == "table":
        return f"unknown table(s) {sorted(keys)}; known: {known}"
    return f"unknown option(s) in the {parent} table {sorted(keys)}; [{parent}] takes {known}"


def _explain_one(problem: Any, field: FieldInfo | None, path: str, table: str, inside: tuple[Any, ...]) -> str:
    kind, got = problem["type"], problem.get("input")
    if kind == "missing" and not inside:
        return f"{path} is missing"
    if kind in ("value_error", "assertion_error"):
        reason = str(problem["ctx"]["error"])
        if field is None or _model_of(field.annotation) is not None:  # about a whole table: says which keys itself
            return reason
        return f"{path} {reason}, got {got!r}" if reason.startswith("must ") else f"{path}: {reason}"
    requirement = _requirement(field) if field is not None else "a table"
    where = f"{path or table or 'the record'} must be {requirement}"
    if inside and kind != "missing":  # a missing item: ``got`` is the whole (too short) list
        return f"{where} ({_position(inside)} is {got!r})"
    return f"{where}, got {got!r}"


def _locate(model: type[BaseModel], loc: tuple[Any, ...], table: str) -> tuple[type[BaseModel], FieldInfo | None, str, tuple]:
    """(model owning the last field, that field, its dotted name, what lies inside it: item indices, dict keys)."""
    owner, field, name = model, None, table
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if field is not None:  # inside a field: an item of a list or dict of tables, or of plain values
            nested = _model_of(_item_type(field.annotation))
            if nested is None:
                return owner, field, name, (part, *parts)
            owner, field, name = nested, None, f"{name}[{part}]" if isinstance(part, int) else f"{name}.{part}"
            continue
        if not isinstance(part, str) or part not in owner.model_fields:  # a key ``owner`` does not have
            return owner, None, f"{name}.{part}" if name else str(part), ()
        field, name = owner.model_fields[part], f"{name}.{part}" if name else part
        nested = _model_of(field.annotation)
        if nested is not None and parts:
            owner, field = nested, None
    return owner, field, name, ()


def _item_type(annotation: Any) -> Any:
    """``M`` of ``list[M]``, ``tuple[M, ...]`` or ``dict[str, M]`` (also when optional); None otherwise."""
    for candidate in (annotation, *_union_members(annotation)):
        args = get_args(candidate)
        if get_origin(candidate) in (list, tuple) and args:
            return args[0]
        if get_origin(candidate) is dict and len(args) == 2:
            return args[1]
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *_union_members(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _union_members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return []


def _position(inside: tuple[Any, ...]) -> str:
    return " ".join(f"item {p}" if isinstance(p, int) else str(p) for p in inside)


def _requirement(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and _SAYS in extra:
        return str(extra[_SAYS])
    return _phrase(field.annotation, list(field.metadata))


def _phrase(annotation: Any, metadata: list[Any], plural: bool = False) -> str:
    """``an integer >= 1``, ``one of a, b``, ``true or false``, ``a list of 3 integers``, ..."""
    if get_origin(annotation) is Annotated:
        inner, *more = get_args(annotation)
        return _phrase(inner, metadata + _expanded(more), plural)
    members = _union_members(annotation)
    if len(members) == 1:
        return _phrase(members[0], metadata, plural)
    for item in metadata:
        if isinstance(item, FieldInfo) and isinstance(item.json_schema_extra, dict) and _SAYS in item.json_schema_extra:
            return str(item.json_schema_extra[_SAYS])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {_phrase(args[0], [], plural=True)}"
    if origin in (list, tuple):
        return f"a list of {_phrase(args[0], [], plural=True)}" if args else "a list"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "tables" if plural else "a table"
    nouns = {bool: ("true or false", "true or false"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings")}
    if annotation in nouns:
        noun = nouns[annotation][plural]
        return noun + (_range(_expanded(metadata)) if annotation in (int, float) else "")
    return "valid"


def _expanded(metadata: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in metadata:
        out.extend([item, *item.metadata] if isinstance(item, FieldInfo) else [item])
    return out


def _range(metadata: list[Any]) -> str:
    bounds = {
        name: getattr(item, name)
        for item in metadata if isinstance(item, annotated_types.BaseMetadata)
        for name in ("ge", "gt", "le", "lt") if getattr(item, name, None) is not None
    }
    if "ge" in bounds and "le" in bounds:
        return f" between {_num(bounds['ge'])} and {_num(bounds['le'])}"
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "".join(f" {'and ' if i else ''}{signs[k]} {_num(v)}" for i, (k, v) in enumerate(bounds.items()))


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


# ----------------------------------------------------------------- TOML


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; an unreadable or malformed file raises FedsegError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FedsegError(f"{path}: cannot read TOML ({exc})") from exc


def _settable(value: Any) -> Any:
    """Unset options left out (TOML has no null; the default then applies), empty tables too."""
    if isinstance(value, Mapping):
        kept = {k: _settable(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}
    if isinstance(value, (list, tuple)):
        return [_settable(v) for v in value]
    return value


def toml_text(tables: Mapping[str, Any]) -> str:
    """``tables`` as TOML text (``None`` values and empty tables left out)."""
    try:
        return tomli_w.dumps(_settable(tables))
    except TypeError as exc:
        raise FedsegError(f"cannot write TOML: {exc}") from exc


def write_toml(path: Path, tables: Mapping[str, Any]) -> None:
    """:func:`toml_text` of ``tables`` in place of ``path``, atomically."""
    write_text(path, toml_text(tables))
