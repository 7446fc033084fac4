"""What the coordinator's and the site's TOML files share: a strict, frozen pydantic base for their tables,
the TOML reader, and the one-line message a bad file is reported with.

A file's schema is declared once, as pydantic models (``coordinator.config``, ``site_agent.config``): choices are
``Literal``, ranges are ``Field(ge=...)`` constraints, unknown keys are refused, and every field carries its default
and a description. TOML values are already typed, so validation is strict: ``"20"`` is not 20 and ``true`` is not
1 (an integer is accepted where a number is wanted). A ``ValidationError`` never leaves the loader: it becomes the
package's config error, one line naming the file, the dotted key, the value and what is allowed::

    coordinator.toml: strategy.max_staleness = -1: must be >= 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import core_schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigTable(BaseModel):
    """A table of a config file: typed, strict, frozen, and refusing keys it does not declare."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def config_dir(info: ValidationInfo) -> Path | None:
    """The folder of the file being validated (the loaders pass it as ``base_dir`` context), if any."""
    base_dir = (info.context or {}).get("base_dir")
    return base_dir if isinstance(base_dir, Path) else None


def relative_to_config(path: Path, info: ValidationInfo) -> Path:
    """``path`` with ``~`` expanded, taken relative to the config file's folder unless it is absolute."""
    path = path.expanduser()
    base_dir = config_dir(info)
    return path if path.is_absolute() or base_dir is None else base_dir / path


class BrokerTable(ConfigTable):
    """``[broker]`` of either file: the URL (declared by each file, with its own default) and the TLS files, whose
    relative paths are relative to the config file (the loader passes its folder as ``base_dir`` context)."""

    url: str
    ca_file: str | None = Field(None, description="CA certificate (PEM) that signed the broker's certificate.")
    cert_file: str | None = Field(None, description="This side's client certificate (PEM), for amqps://.")
    key_file: str | None = Field(None, description="The private key of cert_file (PEM).")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _relative_to_the_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        base_dir = config_dir(info)
        return str((base_dir / value).resolve()) if value and base_dir is not None else value


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The file's tables, or ``error`` saying why not (missing, unreadable, not TOML) in one line."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except OSError as exc:
        raise error(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from None


def choice_by(key: str, default: str, *tags: str) -> Discriminator:
    """For a union of tables, each member annotated with ``Tag(value)``: the value of ``key`` (e.g. ``name``)
    picks the member that validates the rest, and a missing key means ``default``. Each member declares ``key``
    as a one-value ``Literal``, so its options are typed and another member's options are unknown keys.
    """

    def pick(value: Any) -> Any:
        chosen = value.get(key, default) if isinstance(value, Mapping) else getattr(value, key, None)
        return chosen if isinstance(chosen, str) else None  # not a name: refused as not one of the choices

    return Discriminator(
        pick,
        custom_error_type="choice",
        custom_error_message=f"{key} must be one of {', '.join(tags)}",
        custom_error_context={"key": key, "expected": ", ".join(tags)},
    )


@dataclasses.dataclass(frozen=True)
class DataclassTable:
    """Annotated metadata: validate a table against ``table`` (built from a dataclass's fields), then construct
    the dataclass, so its ``__post_init__`` checks run and their ValueErrors name the key; an instance passes."""

    kind: type
    table: type[BaseModel]
    exclude: tuple[str, ...] = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        kind, table, exclude = self.kind, self.table, self.exclude

        def construct(value: Any, validate: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if isinstance(value, kind):
                return value
            fields = validate(value).model_dump(exclude_unset=True)
            try:
                return kind(**fields)
            except TypeError as exc:  # pydantic reports ValueErrors; a constructor's TypeError is one too, here
                raise ValueError(str(exc)) from exc

        return core_schema.no_info_wrap_validator_function(
            construct,
            handler.generate_schema(table),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: {key: item for key, item in dataclasses.asdict(value).items() if key not in exclude}
            ),
        )


def dataclass_table(kind: type, *, exclude: Sequence[str] = ()) -> DataclassTable:
    """The table of a frozen dataclass declared elsewhere (e.g. ``schemas.TrainingConfig``): its fields, types and
    defaults, strict and closed like every table; ``exclude`` names fields a file may not set (nor its dump show)."""
    hints = get_type_hints(kind)
    declared = {
        item.name: (hints[item.name], Field(item.default, description=item.metadata.get("description")))
        for item in dataclasses.fields(kind)
        if item.init and item.name not in exclude
    }
    table = create_model(f"{kind.__name__}Table", __base__=ConfigTable, **declared)  # type: ignore[call-overload]
    return DataclassTable(kind, table, tuple(exclude))


# ------------------------------------------------------------------------------------------ error messages


def describe(exc: ValidationError, model: type[BaseModel], path: Path | str) -> str:
    """One line for all of ``exc``'s errors: ``path: key = value: what is allowed; key2 ...``."""
    problems = [_describe_one(error, model) for error in exc.errors(include_url=False)]
    return f"{path}: " + "; ".join(dict.fromkeys(problems))


def _describe_one(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    keys, _ = _walk(model, error["loc"])
    kind, value, context = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "choice":  # a tagged table: the key that picks the choice is named
        if not isinstance(value, Mapping):
            return f"{_dotted(keys)} = {_shown(value)}: must be a table"
        keys = [*keys, context["key"]]
        return f"{_dotted(keys)} = {_shown(value.get(context['key']))}: must be one of {context['expected']}"
    if kind == "value_error":
        cause = context.get("error")
        field = _field_named_by(cause, value)
        # A constructor that names the key itself, e.g. "batch_size: must be >= 1".
        if field is not None and isinstance(value, Mapping):
            message = str(cause).removeprefix(f"{field}:").strip()
            return f"{_dotted([*keys, field])} = {_shown(value[field])}: {message}"
        return f"{_dotted(keys)} = {_shown(value)}: {cause}"
    if kind == "extra_forbidden":
        known = ", ".join(_table_keys(_walk(model, error["loc"][:-1])[1]))
        return f"{_dotted(keys)} = {_shown(value)}: unknown key" + (f"; allowed here: {known}" if known else "")
    if kind == "missing":
        return f"{_dotted(keys)} is missing: it is required"
    return f"{_dotted(keys)} = {_shown(value)}: {_allowed(kind, context, error.get('msg', ''))}"


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (a string)",
    "finite_number": "a finite number",
}


def _allowed(kind: str, context: Mapping[str, Any], message: str) -> str:
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}"
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        name, sign = bounds[kind]
        bound = context[name]
        return f"must be {sign} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    if kind == "literal_error":
        return f"must be one of {context['expected']}"
    if kind == "string_too_short":
        return "must not be empty" if context.get("min_length") == 1 else message
    if kind == "string_pattern_mismatch":
        return f"must match {context['pattern']}"
    return message[:1].lower() + message[1:]


def _walk(model: type[BaseModel], loc: Sequence[int | str]) -> tuple[list[str], Any]:
    """The dotted key of ``loc`` without the tags a tagged table adds to it, and the table type at its end."""
    keys: list[str] = []
    current: Any = model
    position = 0
    while position < len(loc):
        element = loc[position]
        position += 1
        keys.append(str(element))
        if isinstance(element, int) or not _is_model(current) or element not in current.model_fields:
            current = None
            continue
        info = current.model_fields[element]
        marker = next((item for item in info.metadata if isinstance(item, DataclassTable)), None)
        candidates = {"": marker.table} if marker is not None else _tables_in(info.annotation)
        if len(candidates) > 1 and position < len(loc):  # a tagged table: the tag comes next, skip it
            current = candidates.get(str(loc[position]))
            position += 1
        else:
            current = next(iter(candidates.values()), None)
    return keys, current


def _tables_in(annotation: Any) -> dict[str, Any]:
    """Tables an annotation may hold: one model or dataclass, or several by tag (a tagged union)."""
    if get_origin(annotation) is Annotated:
        return _tables_in(get_args(annotation)[0])
    if _is_model(annotation):
        return {"": annotation}
    found: dict[str, Any] = {}
    for member in get_args(annotation):
        tag = next((item.tag for item in getattr(member, "__metadata__", ()) if isinstance(item, Tag)), "")
        for name, table in _tables_in(member).items():
            found[tag or name] = table
    return found


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _table_keys(table: Any) -> list[str]:
    if _is_model(table):
        return list(table.model_fields)
    return []


def _field_named_by(cause: object, table: object) -> str | None:
    """The key a constructor's ValueError names (``field`` attribute, or a ``key:`` prefix), if it is in ``table``."""
    if not isinstance(table, Mapping) or cause is None:
        return None
    named = getattr(cause, "field", None)
    if isinstance(named, str) and named in table:
        return named
    prefix = str(cause).partition(":")[0].strip()
    return prefix if prefix in table else None


def _dotted(keys: Sequence[str]) -> str:
    return ".".join(keys) if keys else "(top level)"


def _shown(value: object, limit: int = 60) -> str:
    """A value as TOML would show it (``true``, ``"median"``, ``[1, 2]``), shortened."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan, as TOML writes them
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
