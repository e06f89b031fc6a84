"""Racing configurations over paired seeds, on the study's own Optuna trials (design: ``docs/racing.md``).

One Optuna trial is one configuration. It trains its seeds in turn, the same
seed numbers in the same order for every configuration (``race_seeds``), each
seed run in its own folder ``trial-<c>/seed-<s>/`` and MLflow run nested under
the configuration's run. After each seed the race decides (:func:`next_seed`):

- the incumbent is the complete configuration with all k seeds and the best
  mean (:func:`incumbent`); before there is one, the first ``[[enqueue]]``
  point's configuration is the reference, so the first preset earns all k;
- a challenger gets its next seed only while its mean over the seeds it has
  run is not worse than the reference's mean over the same seeds, less
  ``margin`` (SMAC's rule); one that completes k seeds with a better mean is
  the incumbent from then on.

The trial is told the mean over the seeds it ran, so a raced-out configuration
teaches the sampler that its region is poor. Each seed's figures are kept on
the trial (``seed_runs`` attribute; the value also as the intermediate value at
step = seed). A retry of the trial (a stop, a lost worker) carries them, so it
trains only the seeds still missing, resuming the one in flight from its
checkpoint. Nothing here trains: ``bench/racing.py`` drives these same
functions against a simulated objective.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mbu.search.studyfile.race_settings import RaceSettings
from mbu.search.studyfile.study_file import StudyConfig, runs_point
from mbu.train.config import TrainConfig

SEED_RUNS_ATTR = "seed_runs"  # Optuna trial attribute: {seed: {"value", figures, "collapsed", "dir", "run_id"}}
OUTCOME_ATTR = "race_outcome"  # Optuna trial attribute: how its race ended, in words
RACE_SEEDS_ATTR = "mbu_race_seeds"  # Optuna study attribute: k of a racing study (absent: one seed each)
SEED_FIGURES = ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones")


def is_racing(config: StudyConfig) -> bool:
    """Whether the study trains each configuration on more than one seed."""
    return config.race is not None and config.race.seeds > 1


def race_seeds(config: StudyConfig) -> list[int]:
    """The paired seeds, in order: ``[train].seed``, + 1, ..., + k - 1 (k = ``[race].seeds``, 1 without a race)."""
    base = int(config.train.get("seed", TrainConfig.seed))
    count = config.race.seeds if config.race is not None else 1
    return [base + i for i in range(count)]


def collapse_reason(metrics: dict[str, float], settings: RaceSettings) -> str | None:
    """Why a run's masks have degenerated at an evaluation, or None while they have not.

    Only the validation half is read (the test half stays held out). Collapsed: the threshold chosen
    on validation marks at least ``collapse_marked`` of its pixels, or the validation IoU is within
    ``collapse_margin`` of the mask that marks every pixel.
    """
    if not settings.collapse_guard:
        return None
    marked, value = metrics.get("val/marked_fraction"), metrics["val/iou_best"]
    all_ones = metrics.get("baseline/iou_all_ones_val")
    if marked is not None and marked >= settings.collapse_marked:
        return f"the chosen threshold marks {marked:.1%} of the validation pixels"
    if all_ones is not None and value <= all_ones + settings.collapse_margin:
        return f"validation IoU {value:.4f} is within {settings.collapse_margin} of the all-ones mask's {all_ones:.4f}"
    return None


def seed_runs(trial: optuna.trial.FrozenTrial | optuna.Trial) -> dict[int, dict[str, Any]]:
    """The trial's finished seed runs by seed (carried over from the tries it retries)."""
    return {int(seed): run for seed, run in trial.user_attrs.get(SEED_RUNS_ATTR, {}).items()}


def seed_values(trial: optuna.trial.FrozenTrial | optuna.Trial) -> dict[int, float]:
    return {seed: float(run["value"]) for seed, run in seed_runs(trial).items()}


def configuration_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first try of the trial's chain of retries: it names the configuration's folder."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else trial.number


def _sign(study: optuna.Study) -> float:
    return 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0


def seed_count(study: optuna.Study) -> int:
    """k of a racing study, as recorded when it was created; 1 for a study that does not race."""
    return int(study.user_attrs.get(RACE_SEEDS_ATTR, 1))


def incumbent(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete configuration with all k seeds and the best mean (ties: the earlier), or None yet.

    In a study that does not race this is Optuna's best trial.
    """
    k, sign = seed_count(study), _sign(study)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    full = [t for t in complete if len(seed_values(t)) >= k] if k > 1 else complete
    if not full:
        return None
    return max(full, key=lambda t: (sign * t.value, -t.number))


def reference(study: optuna.Study, config: StudyConfig) -> optuna.trial.FrozenTrial | None:
    """What a challenger races against: the incumbent, else the first preset's configuration (its seeds so far)."""
    found = incumbent(study)
    if found is not None or not config.enqueue:
        return found
    point = config.enqueue[0]
    # A failed try is dead: its retry (if any) carries its seeds; a preset queued again starts afresh.
    live = optuna.trial.TrialState.FAIL
    tries = [t for t in study.get_trials(deepcopy=False) if runs_point(t, point) and t.state != live]
    return max(tries, key=lambda t: (len(seed_values(t)), t.number), default=None)


def keeps_racing(values: dict[int, float], rival: dict[int, float], margin: float, sign: float = 1.0) -> bool:
    """SMAC's rule: the challenger's mean over the seeds both ran is not worse than the rival's, less ``margin``.

    With no seed in common there is no evidence against the challenger: it goes on.
    """
    shared = sorted(set(values) & set(rival))
    if not shared:
        return True
    mine = statistics.fmean(values[s] for s in shared)
    theirs = statistics.fmean(rival[s] for s in shared)
    return sign * mine >= sign * theirs - margin


def next_seed(study: optuna.Study, config: StudyConfig, trial: optuna.Trial) -> int | None:
    """The seed this configuration trains next, or None once its race is over (all k seeds, or raced out)."""
    done = seed_values(trial)
    remaining = [seed for seed in race_seeds(config) if seed not in done]
    if not remaining:
        return None
    rival = reference(study, config)
    # The rival is this very trial when it is the first preset's live try (its earlier tries are FAIL).
    if not done or rival is None or rival.number == trial.number:
        return remaining[0]
    return remaining[0] if keeps_racing(done, seed_values(rival), config.race.margin, _sign(study)) else None


def record_seed(trial: optuna.Trial, seed: int, run: dict[str, Any]) -> None:
    """Keep one finished seed run on the trial (``run["value"]`` is its objective) and report it at step = seed."""
    runs = {str(s): r for s, r in seed_runs(trial).items()}
    runs[str(seed)] = run
    trial.set_user_attr(SEED_RUNS_ATTR, runs)
    trial.report(float(run["value"]), seed)


def report_carried(trial: optuna.Trial) -> None:
    """A retry's carried seed values as its intermediate values too (Optuna does not carry those)."""
    for seed, value in sorted(seed_values(trial).items()):
        trial.report(value, seed)


@dataclass(frozen=True)
class RaceResult:
    """A configuration's race once it is over: told to Optuna as ``value``."""

    value: float  # mean objective over the seeds it ran
    figures: dict[str, float]  # each of SEED_FIGURES averaged over those seeds
    outcome: str  # in words: all k seeds, or the seed that raced it out, and any collapsed runs


def race_result(trial: optuna.Trial, config: StudyConfig) -> RaceResult:
    """The mean over the seeds the configuration ran, and how its race ended."""
    runs = seed_runs(trial)
    seeds = sorted(runs)
    figures = {
        key: statistics.fmean(float(runs[s][key]) for s in seeds)
        for key in SEED_FIGURES
        if all(runs[s].get(key) is not None for s in seeds)
    }
    k = len(race_seeds(config))
    outcome = f"all {k} seeds" if len(seeds) >= k else f"raced out after seed {seeds[-1]} ({len(seeds)} of {k})"
    collapsed = [str(s) for s in seeds if runs[s].get("collapsed")]
    if collapsed:
        outcome += f"; collapsed on seed {', '.join(collapsed)}"
    return RaceResult(statistics.fmean(float(runs[s]["value"]) for s in seeds), figures, outcome)


def finish_configuration(trial: optuna.Trial, config: StudyConfig) -> RaceResult:
    """Keep the race's mean figures and outcome on the trial; the caller tells Optuna ``result.value``."""
    result = race_result(trial, config)
    for key, value in result.figures.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(OUTCOME_ATTR, result.outcome)
    return result


def seed_folder(configuration: int, seed: int) -> str:
    """A seed run's folder, relative to the study's folder ``runs/<study>/``."""
    return f"trial-{configuration}/seed-{seed}"


def best_run_folder(study: optuna.Study, number: int, study_dir: Path) -> Path | None:
    """A raced trial's seed run with the best objective (its model is the configuration's to publish); None
    for a trial with no seed runs (a study that does not race: its folder is ``trial-<n>/``)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    runs = {seed: run for seed, run in (seed_runs(trial) if trial is not None else {}).items() if run.get("dir")}
    if not runs:
        return None
    sign = _sign(study)
    seed = max(sorted(runs), key=lambda s: sign * float(runs[s]["value"]))
    return Path(study_dir) / runs[seed]["dir"]
