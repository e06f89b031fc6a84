"""Racing configurations over paired seeds, on the study's own Optuna trials (design: ``docs/racing.md``).

One Optuna trial is one configuration. It trains its seeds (in turn, or some
ahead of the race with ``side_by_side``: ``search.running.population``), the same
seed numbers in the same order for every configuration, each seed run in its
own folder ``trial-<c>/seed-<s>/`` and MLflow run nested under the
configuration's run. After each seed the race decides (:func:`next_seed`):

- the incumbent holds the crown (:func:`incumbent`); before there is one, the
  first ``[[enqueue]]`` point's configuration is the reference, and it trains
  the k race seeds (:func:`race_seeds`) and takes the crown with them;
- a challenger trains the race seeds while its mean over the seeds it has run
  is not worse than the reference's mean over the same seeds, less ``margin``
  (SMAC's rule); one that keeps up trains the crown seeds after them
  (:func:`crown_seeds`) while their mean is not worse than the incumbent's
  judged mean;
- a challenger that ran every seed takes the crown when its crown seeds beat
  the incumbent's judged seeds (:func:`takes_crown`: a one-sided Welch t-test at
  ``crown_confidence``). The crown is judged on seeds the race did not select
  it on, which is what keeps a lucky, fragile configuration out.

The trial is told the mean over the seeds it ran, so a raced-out configuration
teaches the sampler that its region is poor. Each seed's figures are kept on
the trial (``seed_runs`` attribute; the value also as the intermediate value at
step = seed). A retry of the trial (a stop, a lost worker) carries them, so it
trains only the seeds still missing, resuming those in flight from their
checkpoints. Nothing here trains: ``bench/racing.py`` drives these same
functions against a simulated objective.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from scipy import stats

from mbu.search.studyfile.race_settings import RaceSettings
from mbu.search.studyfile.study_file import StudyConfig, runs_point, trial_name
from mbu.train.config import TrainConfig

SEED_RUNS_ATTR = "seed_runs"  # Optuna trial attribute: {seed: {"value", figures, "collapsed", "dir", "run_id"}}
OUTCOME_ATTR = "race_outcome"  # Optuna trial attribute: how its race ended, in words
CROWNED_ATTR = "race_crowned"  # Optuna trial attribute: whether the configuration took the crown when it ended
RACE_SEEDS_ATTR = "mbu_race_seeds"  # Optuna study attribute: k of a racing study (absent: one seed each)
CROWN_SEEDS_ATTR = "mbu_crown_seeds"  # Optuna study attribute: crown seeds of a racing study (absent: 0)
SEED_FIGURES = ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones")


def is_racing(config: StudyConfig) -> bool:
    """Whether the study trains each configuration on more than one seed."""
    return config.race is not None and config.race.seeds > 1


def race_seeds(config: StudyConfig) -> list[int]:
    """The paired seeds, in order: ``[train].seed``, + 1, ..., + k - 1 (k = ``[race].seeds``, 1 without a race)."""
    base = int(config.train.get("seed", TrainConfig.seed))
    count = config.race.seeds if config.race is not None else 1
    return [base + i for i in range(count)]


def crown_seeds(config: StudyConfig) -> list[int]:
    """The seeds after the race's on which a challenger that kept up is judged for the crown ([race].crown_seeds)."""
    if not is_racing(config):
        return []
    last = race_seeds(config)[-1]
    return [last + i for i in range(1, config.race.crown_seeds + 1)]


def search_seeds(config: StudyConfig) -> list[int]:
    """Every seed the search may train a configuration on: the race's, then the crown's."""
    return race_seeds(config) + crown_seeds(config)


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


def crown_count(study: optuna.Study) -> int:
    """Crown seeds of a racing study, as recorded when it was created (0 for one raced before they existed)."""
    return int(study.user_attrs.get(CROWN_SEEDS_ATTR, 0))


def judged_values(trial: optuna.trial.FrozenTrial | optuna.Trial, k: int) -> dict[int, float]:
    """The values a configuration's crown is judged on: its crown seeds (those after its first k) when it ran
    any, else its race seeds. A first incumbent's race seeds were not selected on: it was queued, not raced."""
    values = seed_values(trial)
    crown = {seed: values[seed] for seed in sorted(values)[k:]}
    return crown or values


def took_crown(trial: optuna.trial.FrozenTrial, k: int) -> bool:
    """Whether the complete configuration took the crown when its race ended; one from before the crown was
    kept (no attribute) took it if it ran all k race seeds."""
    return bool(trial.user_attrs.get(CROWNED_ATTR, len(seed_values(trial)) >= k))


def incumbent(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The configuration holding the crown, or None yet: of the complete ones that took it when their race
    ended, the one with the best judged mean (ties: the earlier). That is the last to take it, since each
    beat the holder of its time; with concurrent workers, the better of two that took it from the same one.

    A trial from before the crown was kept (no attribute) counts as having taken it with all k race seeds.
    In a study that does not race this is Optuna's best trial.
    """
    k, sign = seed_count(study), _sign(study)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if k <= 1:
        return max(complete, key=lambda t: (sign * t.value, -t.number), default=None)
    crowned = [t for t in complete if took_crown(t, k)]
    return max(crowned, key=lambda t: (sign * statistics.fmean(judged_values(t, k).values()), -t.number), default=None)


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


def _is_first(rival: optuna.trial.FrozenTrial | None, trial: optuna.Trial) -> bool:
    """Whether the trial races nobody: no reference yet, or it is the first preset's live try itself."""
    return rival is None or rival.number == trial.number


def _rival_and_plan(
    study: optuna.Study, config: StudyConfig, trial: optuna.Trial
) -> tuple[optuna.trial.FrozenTrial | None, bool, list[int]]:
    """What the configuration races (its reference), whether it races nobody, and its seed plan."""
    rival = reference(study, config)
    first = _is_first(rival, trial)
    return rival, first, race_seeds(config) if first else search_seeds(config)


def seed_plan(study: optuna.Study, config: StudyConfig, trial: optuna.Trial) -> list[int]:
    """Every seed the configuration trains if it keeps up: the race's, then (a challenger's) the crown's."""
    return _rival_and_plan(study, config, trial)[2]


def next_seed(study: optuna.Study, config: StudyConfig, trial: optuna.Trial) -> int | None:
    """The seed this configuration trains next, or None once its race is over (every seed, or raced out)."""
    done = seed_values(trial)
    rival, first, plan = _rival_and_plan(study, config, trial)
    remaining = [seed for seed in plan if seed not in done]
    if not remaining:
        return None
    if not done or first:
        return remaining[0]
    sign, margin = _sign(study), config.race.margin
    race = set(race_seeds(config))
    crown = {seed: value for seed, value in done.items() if seed not in race}
    if crown:  # the crown stage: its crown seeds so far against the incumbent's judged mean
        held = judged_values(rival, len(race))  # empty while a concurrent first preset has no seed yet
        goes_on = not held or sign * statistics.fmean(crown.values()) >= sign * statistics.fmean(held.values()) - margin
    else:
        goes_on = keeps_racing(done, seed_values(rival), margin, sign)
    return remaining[0] if goes_on else None


def takes_crown(
    challenger: list[float], holder: list[float], confidence: float, sign: float = 1.0
) -> tuple[bool, float | None]:
    """Whether the challenger's judged values beat the holder's, and the one-sided Welch t-test's p-value.

    With ``confidence`` 0, or fewer than two values a side, or no spread on both sides, a better mean is
    enough (p is None); otherwise the mean must be better and p below ``1 - confidence``. A tie keeps the holder.
    """
    better = sign * statistics.fmean(challenger) > sign * statistics.fmean(holder)
    if confidence <= 0 or len(challenger) < 2 or len(holder) < 2:
        return better, None
    if statistics.variance(challenger) == 0 and statistics.variance(holder) == 0:
        return better, None
    alternative = "greater" if sign > 0 else "less"
    p = float(stats.ttest_ind(challenger, holder, equal_var=False, alternative=alternative).pvalue)
    return better and p < 1.0 - confidence, p


def crown_verdict(study: optuna.Study, trial: optuna.Trial, config: StudyConfig) -> tuple[bool, str]:
    """Whether the configuration, its race over, takes the crown, and why in words."""
    done = seed_values(trial)
    rival = reference(study, config)
    k = len(race_seeds(config))
    if _is_first(rival, trial):
        return True, "the first incumbent"
    if any(seed not in done for seed in search_seeds(config)):
        return False, ""
    if not seed_values(rival):  # the first preset, training elsewhere, has no seed yet: nothing to judge against
        return False, f"no seed of trial {rival.number} (the first preset) to judge it against yet: not crowned"
    mine, held = judged_values(trial, k), judged_values(rival, k)
    confidence = config.race.crown_confidence
    crowned, p = takes_crown(list(mine.values()), list(held.values()), confidence, _sign(study))
    test = "" if p is None else f", one-sided Welch p = {p:.3f}"
    if crowned:
        return True, f"took the crown from trial {rival.number}{test}"
    level = f" at {confidence:.0%} confidence" if p is not None else ""
    return False, f"did not beat trial {rival.number}{level}{test}: the crown stays"


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
    outcome: str  # in words: all its seeds or the seed that raced it out, the crown, any collapsed runs
    crowned: bool  # it took the crown when its race ended


def race_result(study: optuna.Study, trial: optuna.Trial, config: StudyConfig) -> RaceResult:
    """The mean over the seeds the configuration ran, how its race ended, and whether it took the crown."""
    runs = seed_runs(trial)
    seeds = sorted(runs)
    figures = {
        key: statistics.fmean(float(runs[s][key]) for s in seeds)
        for key in SEED_FIGURES
        if all(runs[s].get(key) is not None for s in seeds)
    }
    race, crown = race_seeds(config), crown_seeds(config)
    crowned, why = crown_verdict(study, trial, config)
    ran_crown = [s for s in seeds if s in crown]
    if len(seeds) < len(race):
        outcome = f"raced out after seed {seeds[-1]} ({len(seeds)} of {len(race)})"
    elif crown and ran_crown and len(ran_crown) < len(crown):
        outcome = f"raced out after crown seed {seeds[-1]} ({len(ran_crown)} of {len(crown)})"
    elif crown and not ran_crown and not crowned:
        outcome = f"raced out after seed {seeds[-1]} ({len(seeds)} of {len(race)}), before the crown seeds"
    else:
        outcome = f"all {len(seeds)} seeds"
    if why:
        outcome += f"; {why}"
    collapsed = [str(s) for s in seeds if runs[s].get("collapsed")]
    if collapsed:
        outcome += f"; collapsed on seed {', '.join(collapsed)}"
    return RaceResult(statistics.fmean(float(runs[s]["value"]) for s in seeds), figures, outcome, crowned)


def finish_configuration(study: optuna.Study, trial: optuna.Trial, config: StudyConfig) -> RaceResult:
    """Keep the race's mean figures, outcome and crown on the trial; the caller tells Optuna ``result.value``."""
    result = race_result(study, trial, config)
    for key, value in result.figures.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(OUTCOME_ATTR, result.outcome)
    trial.set_user_attr(CROWNED_ATTR, result.crowned)
    return result


def seed_folder(configuration: int, seed: int) -> str:
    """A seed run's folder, relative to the study's folder ``runs/<study>/``."""
    return f"{trial_name(configuration)}/seed-{seed}"


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
