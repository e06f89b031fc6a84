"""``[race]``: how many paired seeds a configuration may earn, how it takes the crown, when a run has collapsed.

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
    # Seeds after the race's that a challenger which kept up trains before it may take the crown: the crown is
    # judged on them alone, seeds its race did not select it on. Absent: as many as seeds; 0: judged on the race.
    # Ignored with seeds = 1.
    crown_seeds: int | None = None
    crown_confidence: float = 0.9  # one-sided Welch t-test level the crown is taken at; 0: a higher mean is enough
    # With [study].population > 1: a configuration trains its next seeds side by side in the population's free
    # places, ahead of the race's decisions; a seed the race then does not grant is cancelled, leaving no trace.
    side_by_side: bool = False
    collapse_guard: bool = True  # end a run at an evaluation whose masks have degenerated (see collapse_reason)
    collapse_margin: float = 0.02  # collapsed: validation IoU within this of the all-ones mask's (validation half)
    collapse_marked: float = 0.99  # collapsed: the chosen threshold marks at least this share of validation pixels

    def __post_init__(self) -> None:
        if self.crown_seeds is None:  # as many as the race's; none where there is no race (seeds = 1)
            self.crown_seeds = self.seeds if isinstance(self.seeds, int) and self.seeds > 1 else 0


def race_problem(settings: RaceSettings) -> tuple[str, str] | None:
    """The first bad value as (key, why), or None."""
    problem = positive_integer_problem(settings.seeds)
    if problem is not None:
        return "seeds", problem
    if isinstance(settings.crown_seeds, bool) or not isinstance(settings.crown_seeds, int) or settings.crown_seeds < 0:
        return "crown_seeds", f"must be a non-negative integer, got {settings.crown_seeds!r}"
    if settings.seeds > 1 and settings.crown_seeds == 1 and settings.crown_confidence > 0:
        return "crown_seeds", "must be 0 or at least 2 with a crown_confidence (a t-test needs two values a side)"
    for key in ("margin", "crown_confidence", "collapse_margin"):
        value = getattr(settings, key)
        if not 0.0 <= value < 1.0:
            return key, f"must be in [0, 1), got {value!r}"
    if not 0.0 < settings.collapse_marked <= 1.0:
        return "collapse_marked", f"must be in (0, 1], got {settings.collapse_marked!r}"
    return None


def parse_race(raw: dict[str, Any], path: Path) -> RaceSettings | None:
    """``[race]``, or None when the study file has no such table (one seed per configuration, no guard)."""
    return optional_table(raw, "race", RaceSettings, race_problem, path)
