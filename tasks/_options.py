"""Typed readers for the ``[task]`` table of a site's TOML config.

TOML already gives typed values; these helpers only check them and name the offending key in the error, so a
hospital's IT sees ``[task] npz: expected a string`` instead of a traceback from deep inside a loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.errors import TaskConfigError

_MISSING: Any = object()


def _fetch(options: Mapping[str, Any], key: str, default: Any) -> Any:
    if key in options and options[key] is not None:
        return options[key]
    if default is _MISSING:
        raise TaskConfigError(f"[task] {key}: required option is missing")
    return default


def option_str(options: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _fetch(options, key, default)
    if value is not default and not isinstance(value, str):
        raise TaskConfigError(f"[task] {key}: expected a string, got {type(value).__name__}")
    return value


def option_path(options: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _fetch(options, key, default)
    if value is default:
        return value
    if not isinstance(value, (str, Path)):
        raise TaskConfigError(f"[task] {key}: expected a file path, got {type(value).__name__}")
    return Path(value).expanduser()


def option_int(options: Mapping[str, Any], key: str, default: Any = _MISSING, minimum: int | None = None) -> Any:
    value = _fetch(options, key, default)
    if value is default:
        return value
    if type(value) is not int:
        raise TaskConfigError(f"[task] {key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise TaskConfigError(f"[task] {key}: must be >= {minimum}, got {value}")
    return value


def option_float(options: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _fetch(options, key, default)
    if value is default:
        return value
    if type(value) not in (int, float):
        raise TaskConfigError(f"[task] {key}: expected a number, got {value!r}")
    return float(value)


def option_str_list(options: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _fetch(options, key, default)
    if value is default:
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TaskConfigError(f"[task] {key}: expected a list of strings, got {value!r}")
    return list(value)
