"""What a race found, for the user: configurations ranked by their paired mean, the raced-out ones, the cost.

Read from the study's complete trials (``search.judging.race`` keeps each seed run's
figures on its trial). Shared by the line ``mbu search`` ends with, ``--summary``,
``study_report.{md,json}`` and the champion's tags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from mbu.search.judging.confirm_report import Interval, t_interval
from mbu.search.judging.race import (
    OUTCOME_ATTR,
    configuration_number,
    crown_count,
    incumbent,
    seed_count,
    seed_runs,
    took_crown,
)


@dataclass
class RacedConfiguration:
    """One configuration whose race is over."""

    trial: int  # the Optuna trial told its mean
    configuration: int  # the first try of its chain: its folder is trial-<configuration>/
    params: dict[str, float]
    seeds: list[int]  # the seeds it ran, in order
    val_iou: list[float]  # per seed, the objective
    test_iou: list[float]  # per seed
    val_interval: Interval
    test_interval: Interval
    collapsed: dict[int, str]  # seed -> why that run was ended early
    outcome: str  # in words
    crowned: bool  # it took the crown when its race ended

    @property
    def complete_race(self) -> bool:
        return "raced out" not in self.outcome


def raced_configurations(study: optuna.Study) -> list[RacedConfiguration]:
    """Every complete configuration, best paired mean first (those with all k seeds before the raced-out ones)."""
    k = seed_count(study)
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        runs = seed_runs(trial)
        seeds = sorted(runs)
        val = [float(runs[s]["value"]) for s in seeds]
        test = [float(runs[s]["test/iou"]) for s in seeds if runs[s].get("test/iou") is not None]
        rows.append(
            RacedConfiguration(
                trial.number,
                configuration_number(trial),
                dict(trial.params),
                seeds,
                val,
                test,
                t_interval(val),
                t_interval(test),
                {s: runs[s]["collapsed"] for s in seeds if runs[s].get("collapsed")},
                str(trial.user_attrs.get(OUTCOME_ATTR, "")),
                took_crown(trial, k),
            )
        )
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(rows, key=lambda r: (not r.complete_race, sign * r.val_interval.mean, r.trial))


@dataclass
class RaceSummary:
    """The race at a glance: who leads, what it cost, what it saved."""

    seeds: int  # k
    crown_seeds: int  # after the race's, for a challenger that kept up
    incumbent: RacedConfiguration | None
    ranked: list[RacedConfiguration]
    seed_runs: int  # seed runs the complete configurations spent
    full_cost: int  # what training every one of them on every seed would have spent

    @property
    def raced_out(self) -> list[RacedConfiguration]:
        return [r for r in self.ranked if not r.complete_race]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["incumbent"] = self.incumbent.trial if self.incumbent else None
        return data


def race_summary(study: optuna.Study) -> RaceSummary:
    ranked = raced_configurations(study)
    best = incumbent(study)
    leader = next((r for r in ranked if best is not None and r.trial == best.number), None)
    k, crown = seed_count(study), crown_count(study)
    # Every seed each could earn: a crown held without crown seeds (the first incumbent's) had only the race's.
    full = sum(k if r.crowned and len(r.seeds) <= k else k + crown for r in ranked)
    return RaceSummary(k, crown, leader, ranked, sum(len(r.seeds) for r in ranked), full)


def _interval(interval: Interval) -> str:
    if interval.low is None:
        return "one seed: no interval"
    return f"sd {interval.sd:.4f}, 95% interval [{interval.low:.4f}, {interval.high:.4f}]"


def incumbent_lines(race: RaceSummary) -> list[str]:
    """``best configuration: ...`` with its per-seed figures, for the end of ``mbu search`` and ``--summary``."""
    best = race.incumbent
    if best is None:
        return [f"no configuration has finished its race yet ({race.seeds} seeds)"]
    seeds = ", ".join(f"{v:.4f}" for v in best.test_iou)
    return [
        f"best configuration: trial {best.trial}, mean test IoU over {len(best.seeds)} seeds "
        f"{best.test_interval.mean:.4f} ({_interval(best.test_interval)}); per seed {seeds}",
        *(f"  collapsed: seed {s}: {why}" for s, why in best.collapsed.items()),
    ]


def cost_line(race: RaceSummary) -> str:
    saved = race.full_cost - race.seed_runs
    out = len(race.raced_out)
    each = f"{race.seeds} + {race.crown_seeds} crown" if race.crown_seeds else f"{race.seeds}"
    return (
        f"race: {race.seed_runs} seed runs for {len(race.ranked)} configurations ({saved} saved against "
        f"{each} seeds each); {out} raced out"
    )


def race_markdown(race: RaceSummary) -> list[str]:
    """The study report's race section."""
    lines = ["## Configurations raced over paired seeds", "", cost_line(race) + ".", ""]
    if not race.ranked:
        return [*lines, "No configuration has finished its race yet."]
    lines += [
        "| trial | seeds | mean val IoU | mean test IoU | test sd | test 95% interval | test IoU per seed | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in race.ranked:
        iv = r.test_interval
        interval = "-" if iv.low is None else f"[{iv.low:.4f}, {iv.high:.4f}]"
        sd = "-" if iv.sd is None else f"{iv.sd:.4f}"
        per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in zip(r.seeds, r.test_iou, strict=False))
        mark = " **(incumbent)**" if race.incumbent is not None and r.trial == race.incumbent.trial else ""
        lines.append(
            f"| {r.trial}{mark} | {len(r.seeds)} | {r.val_interval.mean:.4f} | {iv.mean:.4f} | {sd} | {interval} "
            f"| {per_seed} | {r.outcome} |"
        )
    collapsed = [(r.trial, s, why) for r in race.ranked for s, why in r.collapsed.items()]
    if collapsed:
        lines += ["", "Collapsed runs (ended at that evaluation, scored as they were):", ""]
        lines += [f"- trial {trial}, seed {seed}: {why}" for trial, seed, why in collapsed]
    return lines
