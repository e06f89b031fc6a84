"""``[race]``: how many paired seeds a configuration may earn, and when a run counts as collapsed.

Kept apart from ``search.judging.race`` (which runs the race on an Optuna study) so that
reading a study file needs neither Optuna nor MLflow. What the keys mean and
why: ``docs/racing.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbu.search.studyfile.typed_tables import optional_table, positive_integer_problem


@dataclass
class RaceSettings:
    seeds: int = 3  # paired training seeds a configuration may earn; 1: one seed each (no racing)
    margin: float = 0.0  # a challenger keeps racing while its mean >= the incumbent's mean - margin, on shared seeds
    collapse_guard: bool = True  # end a run at an evaluation whose masks have degenerated (see collapse_reason)
    collapse_margin: float = 0.02  # collapsed: validation IoU within this of the all-ones mask's (validation half)
    collapse_marked: float = 0.99  # collapsed: the chosen threshold marks at least this share of validation pixels


def race_problem(settings: RaceSettings) -> tuple[str, str] | None:
    """The first bad value as (key, why), or None."""
    problem = positive_integer_problem(settings.seeds)
    if problem is not None:
        return "seeds", problem
    for key in ("margin", "collapse_margin"):
        value = getattr(settings, key)
        if not 0.0 <= value < 1.0:
            return key, f"must be in [0, 1), got {value!r}"
    if not 0.0 < settings.collapse_marked <= 1.0:
        return "collapse_marked", f"must be in (0, 1], got {settings.collapse_marked!r}"
    return None


def parse_race(raw: dict[str, Any], path: Path) -> RaceSettings | None:
    """``[race]``, or None when the study file has no such table (one seed per configuration, no guard)."""
    return optional_table(raw, "race", RaceSettings, race_problem, path)
