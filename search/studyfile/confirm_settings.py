"""``[confirm]``: which of a study's trials are trained again on fresh seeds, and how many seeds.

Kept apart from ``search.judging.confirm`` (which runs the stage) so that reading a
study file needs neither Optuna nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbu.search.studyfile.typed_tables import optional_table, positive_integer_problem


@dataclass
class ConfirmSettings:
    top_k: int = 1  # the best k complete trials by the objective are confirmed
    seeds: int = 3  # fresh training seeds per candidate, the same seeds for every candidate (paired)
    presets: bool = True  # also confirm the trial of every [[enqueue]] point (the published presets)


MAX_SEEDS = 100  # past this a t interval is within 1 % of the normal one: more seeds cost time and tell nothing


def confirm_problem(settings: ConfirmSettings) -> tuple[str, str] | None:
    """The first bad value as (key, why), or None; shared by the study file and the flags."""
    for key in ("top_k", "seeds"):
        problem = positive_integer_problem(getattr(settings, key))
        if problem is not None:
            return key, problem
    if settings.seeds > MAX_SEEDS:
        return "seeds", (
            f"is {settings.seeds}, more than {MAX_SEEDS}: each seed is one more training run per candidate, and "
            f"past {MAX_SEEDS} seeds the 95 % interval narrows by less than a percent"
        )
    if not isinstance(settings.presets, bool):
        return "presets", f"must be true or false, got {settings.presets!r}"
    return None


def parse_confirm(raw: dict[str, Any], path: Path) -> ConfirmSettings | None:
    """``[confirm]``, or None when the study file has no such table (no confirmation stage)."""
    return optional_table(raw, "confirm", ConfirmSettings, confirm_problem, path)
