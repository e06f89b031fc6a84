"""TOML tables into typed dataclasses: unknown keys, missing keys and wrong types named with file and key."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any


class StudyFileError(ValueError):
    """A study file that cannot run; the message names the file and the key."""


def check_keys(where: str, table: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise StudyFileError(f"{path}: unknown key {where}.{unknown[0]} (allowed: {', '.join(sorted(allowed))})")


# TOML value types a dataclass field of each annotation accepts (an int is a float; a bool is neither).
_EXPECTED = {int: ("an integer", (int,)), float: ("a number", (int, float)), str: ("a string", (str,)),
             bool: ("true or false", (bool,))}  # fmt: skip


def check_types(hints: dict[str, Any], where: str, table: dict[str, Any], path: Path) -> None:
    """A value of the wrong TOML type (``high = "10"``, ``log = "false"``) is an error naming the key."""
    for key, value in table.items():
        hint = hints.get(key)
        if typing.get_origin(hint) in (list, dict):
            continue  # containers ([slurm].sbatch, setup) are checked by their table's own checks
        accepted = [t for t in typing.get_args(hint) or (hint,) if t in _EXPECTED]
        if not accepted or value is None:
            continue
        if isinstance(value, bool) and bool not in accepted:
            ok = False
        else:
            ok = any(isinstance(value, _EXPECTED[t][1]) for t in accepted)
        if not ok:
            expected = " or ".join(_EXPECTED[t][0] for t in accepted)
            raise StudyFileError(f"{path}: {where}.{key} must be {expected}, got {value!r}")


def typed_table(cls: type, where: str, table: dict[str, Any], path: Path) -> Any:
    check_keys(where, table, {f.name for f in fields(cls)}, path)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in table]
    if missing:
        raise StudyFileError(f"{path}: missing key {where}.{missing[0]} (required: {', '.join(required)})")
    check_types(typing.get_type_hints(cls), where, table, path)
    try:
        return cls(**table)
    except (TypeError, ValueError) as err:
        raise StudyFileError(f"{path}: {where}: {err}") from err


def optional_table(
    raw: dict[str, Any], key: str, cls: type, problem: Callable[[Any], tuple[str, str] | None], path: Path
) -> Any | None:
    """Table ``[key]`` as ``cls``, checked by ``problem`` (the first bad value as (key, why)); None when absent."""
    if key not in raw:
        return None
    if not isinstance(raw[key], dict):
        keys = ", ".join(f.name for f in fields(cls))
        raise StudyFileError(f"{path}: [{key}] must be a table with {keys}")
    settings = typed_table(cls, f"[{key}]", raw[key], path)
    found = problem(settings)
    if found is not None:
        raise StudyFileError(f"{path}: [{key}].{found[0]} {found[1]}")
    return settings


def positive_integer_problem(value: Any) -> str | None:
    """What is wrong with a value that must be a positive integer (``True`` is not one), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None
