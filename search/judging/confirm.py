"""The confirmation stage: a study's best trials and its presets trained again on fresh seeds.

A search names its best trial from one training seed, and the seed alone moves
the IoU about as much as the search gains; so once the search has its
``n_trials``, each candidate (the ``[confirm].top_k`` best complete trials, and
the trial of each ``[[enqueue]]`` point when ``presets``) is trained again on
``seeds`` fresh seeds: ``[train].seed`` + 1, + 2, ..., the same seeds for every
candidate so that comparisons are paired. The search-time run is never one of
them. ``search.judging.confirm_report`` turns the runs into intervals and verdicts.

The confirmation runs are the trials of a second Optuna study in the same
storage, ``<study>/confirm`` (no study file can give a name with a ``/``), each
queued with its candidate's parameters and its seed. So every launcher (one
worker, ``--workers``, ``--population``, ``--slurm``), heartbeats, retries from
checkpoint and stops work on them unchanged, and a relaunch runs only what is
missing: raising ``seeds`` or ``top_k`` queues the new pairs. Their folders are
``runs/<study>/confirm/trial-<n>/``; their MLflow runs sit under the study's
parent run, tagged ``stage=confirm``, ``candidate``, ``candidate_trial`` and
``seed``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.data.images import AnnotatedImages
from mbu.search.cluster.workers import launch_lock
from mbu.search.judging.confirm_report import CANDIDATE_ATTR, parent_figures, write_confirm_report
from mbu.search.judging.race import best_run_folder, incumbent, search_seeds, seed_count, seed_values
from mbu.search.judging.registry import registered_name
from mbu.search.launching.storage import count_finished, count_taken
from mbu.search.launching.study import check_study_folder, open_study, runs_point
from mbu.search.running.runner import TrialsEnded, run_trials
from mbu.search.running.tracking import RUN_NAME_ATTR, RUN_TAGS_ATTR, open_parent_run
from mbu.search.running.trial import TRAIN_SEED_ATTR
from mbu.search.studyfile.study_file import StudyConfig, trial_name
from mbu.train.stop import StopRequest

STAGE = "confirm"


@dataclass(frozen=True)
class Candidate:
    """A search trial whose parameters are confirmed."""

    trial: int  # its number in the search
    params: dict[str, float]
    label: str  # "trial 3", "preset #1 (trial 0)"
    preset: int | None  # index of its [[enqueue]] point, None for a top-k trial that is no preset
    search_value: float  # the objective (validation IoU) it was chosen on
    search_test_iou: float | None


def stage_name(study_name: str) -> str:
    """The Optuna study holding a study's confirmation runs."""
    return f"{study_name}/{STAGE}"


def fresh_seeds(config: StudyConfig, count: int) -> list[int]:
    """``count`` training seeds that the search never trained with: the ones after the race's and crown's seeds.

    Without a race the search trains on [train].seed alone, so these are [train].seed + 1, ..., + count.
    """
    last = search_seeds(config)[-1]
    return [last + i for i in range(1, count + 1)]


def candidates(study: optuna.Study, config: StudyConfig) -> list[Candidate]:
    """The top-k complete trials by the objective (a race's incumbent first), then the presets' trials; one line
    if there are too few."""
    settings, name = config.confirm, config.study.name
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    top_k, eligible = settings.top_k, complete
    if seed_count(study) > 1:  # a race: the top k among the configurations that ran all k seeds
        eligible = [t for t in complete if len(seed_values(t)) >= seed_count(study)]
        top_k = min(top_k, len(eligible))  # a race ends most configurations early: confirm those it has
    if not eligible:
        raise ValueError(f"study {name} has no complete trial to confirm")
    if top_k > len(eligible):
        raise ValueError(
            f"[confirm].top_k = {settings.top_k}, but study {name} has {len(eligible)} complete trial(s): "
            "lower top_k or run more trials"
        )
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(eligible, key=lambda t: -t.value if maximize else t.value)  # stable: ties by number
    holder = incumbent(study) if seed_count(study) > 1 else None
    if holder is not None:  # the crown, not the mean over every seed, decides a race's best
        ranked.sort(key=lambda t: t.number != holder.number)
    chosen = {t.number: _candidate(t, f"trial {t.number}", None) for t in ranked[:top_k]}
    for index, point in enumerate(config.enqueue if settings.presets else []):
        runs = [t for t in complete if runs_point(t, point)]  # a raced-out preset too: the baseline to beat
        if not runs:
            continue  # the preset never completed: the report says so
        first = min(runs, key=lambda t: t.number)
        label = preset_label(index, first.number)
        if first.number in chosen:
            label = f"trial {first.number}, preset #{index + 1}"
        chosen[first.number] = _candidate(first, label, index)
    return list(chosen.values())


def missing_presets(study: optuna.Study, config: StudyConfig) -> list[str]:
    """The ``[[enqueue]]`` points that no complete trial ran, each with what became of its trials."""
    if not config.confirm.presets:
        return []
    trials = study.get_trials(deepcopy=False)
    missing = []
    for index, point in enumerate(config.enqueue):
        tries = [t for t in trials if runs_point(t, point)]
        if any(t.state == optuna.trial.TrialState.COMPLETE for t in tries):
            continue
        states = sorted({t.state.name for t in tries})
        error = next((t.user_attrs["error"] for t in reversed(tries) if "error" in t.user_attrs), None)
        why = f"its {len(tries)} trial(s) ended {'/'.join(states)}" if tries else "it never ran"
        why += f": {error.splitlines()[0][:200]}" if error else ""
        missing.append(f"preset #{index + 1} has no complete trial in the search ({why})")
    return missing


def preset_label(index: int, number: int) -> str:
    """``preset #2 (trial 5)``: the ``[[enqueue]]`` point ``index`` and the trial that ran it."""
    return f"preset #{index + 1} (trial {number})"


def _candidate(trial: optuna.trial.FrozenTrial, label: str, preset: int | None) -> Candidate:
    return Candidate(trial.number, dict(trial.params), label, preset, trial.value, trial.user_attrs.get("test/iou"))


def stage_config(config: StudyConfig, n_runs: int) -> StudyConfig:
    """The confirmation study's config: the search's settings, its own name, folder and queued runs only."""
    settings = replace(config.study, name=stage_name(config.study.name), n_trials=max(n_runs, 1), pruner="none")
    return replace(
        config,
        study=settings,
        data_root=str(config.resolved_data_root()),  # the search's data, not a copy in the stage's folder
        synthetic=None,
        enqueue=[],
        confirm=None,
        race=None,  # each confirmation run is one training on its own seed, never a race
        experiment=config.experiment_name,  # the runs go into the study's own MLflow experiment
        queued_only=True,
    )


@dataclass
class Stage:
    """A confirmation prepared: its study, config (target: the runs still to finish), candidates, seeds."""

    study: optuna.Study
    config: StudyConfig
    candidates: list[Candidate]
    seeds: list[int]
    abandoned: list[tuple[int, int]]  # (candidate trial, seed) pairs that failed more than max_retry times
    missing_presets: list[str] = field(default_factory=list)  # presets with no complete trial to confirm, and why


def runs_of(study: optuna.Study, trial: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    """The confirmation study's tries of one (candidate, seed) pair."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(CANDIDATE_ATTR) == trial and t.user_attrs.get(TRAIN_SEED_ATTR) == seed
    ]


def queue_runs(
    study: optuna.Study, chosen: list[Candidate], seeds: list[int], max_retry: int, seconds: float | None = None
) -> list[tuple]:
    """Queue every (candidate, seed) pair with no live or finished try, seed by seed; returns the given-up pairs.

    Seed-major order: an interrupted confirmation already holds paired runs. A pair whose tries all
    failed is queued again up to ``max_retry`` times, as a preset is. What is queued is said first, with
    its cost at ``seconds`` a run (the search's pace).
    """
    queue, abandoned = [], []
    for seed in seeds:
        for candidate in chosen:
            tries = runs_of(study, candidate.trial, seed)
            failures = sum(t.state == optuna.trial.TrialState.FAIL for t in tries)
            if len(tries) > failures:
                continue  # waiting, running or finished
            if failures > max_retry:
                abandoned.append((candidate.trial, seed))
                continue
            queue.append((candidate, seed))
    if queue:
        print(cost_line(len(queue), len(chosen), len(seeds), seconds), flush=True)
    for candidate, seed in queue:
        name = f"confirm trial-{candidate.trial} seed-{seed}"
        tags = {"stage": STAGE, "candidate": candidate.label, "candidate_trial": candidate.trial, "seed": seed}
        attrs = {CANDIDATE_ATTR: candidate.trial, TRAIN_SEED_ATTR: seed, RUN_NAME_ATTR: name, RUN_TAGS_ATTR: tags}
        study.enqueue_trial(candidate.params, user_attrs=attrs)
    return abandoned


def run_seconds(study: optuna.Study) -> float | None:
    """The median wall time of one training run among a study's complete trials (a raced trial's, per seed)."""
    times = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.datetime_start is not None and t.datetime_complete is not None:
            runs = max(1, len(seed_values(t)))
            times.append((t.datetime_complete - t.datetime_start).total_seconds() / runs)
    return statistics.median(times) if times else None


def cost_line(runs: int, candidates: int, seeds: int, seconds: float | None) -> str:
    """What a confirmation is about to queue, and what it will cost at the search's pace."""
    line = f"confirmation: queuing {runs} run(s) ({candidates} candidate(s) x {seeds} seed(s))"
    if seconds is None:
        return line
    return (
        f"{line}; one run took about {duration(seconds)} in the search: about {duration(runs * seconds)} on one worker"
    )


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def prepare_stage(config: StudyConfig, search: optuna.Study) -> Stage:
    """Candidates chosen, the confirmation study opened and its missing runs queued (under the launch lock).

    Everything that can be refused (no complete trial, ``top_k`` too large) is checked before anything
    is written.
    """
    chosen, seeds = published_scope(config, search)
    check_candidate_folders(config, search, chosen)
    planned = stage_config(config, len(chosen) * len(seeds))
    check_study_folder(planned)
    study = open_study(planned)
    count_taken(study)  # fails (and queues retries of) runs whose worker died
    abandoned = queue_runs(study, chosen, seeds, config.study.max_retry, run_seconds(search))
    target = len(chosen) * len(seeds) - len(abandoned)
    planned = replace(planned, study=replace(planned.study, n_trials=max(target, 1)))
    return Stage(study, planned, chosen, seeds, abandoned, missing_presets(search, config))


def published_scope(config: StudyConfig, search: optuna.Study) -> tuple[list[Candidate], list[int]]:
    """The candidates and fresh seeds of this confirmation: what ``[confirm]`` and the flags ask for, widened to
    every candidate and seed an earlier launch confirmed, since published evidence never shrinks (a lower
    ``--seeds``, ``--top-k`` or ``--no-presets`` would rewrite the report and the registry on fewer runs)."""
    chosen = candidates(search, config)
    seeds = fresh_seeds(config, config.confirm.seeds)
    before = confirmed_before(config)
    kept = []
    widest = max((seed for done in before.values() for seed in done), default=0) - search_seeds(config)[-1]
    if widest > len(seeds):
        seeds = fresh_seeds(config, widest)
        kept.append(f"all {widest} seeds")
    earlier = sorted(set(before) - {c.trial for c in chosen})
    if earlier:
        chosen += [earlier_candidate(search, config, number) for number in earlier]
        kept.append(f"candidate(s) {', '.join(c.label for c in chosen[-len(earlier) :])}")
    if kept:
        print(f"confirmation: keeps {' and '.join(kept)} already confirmed (its published evidence never shrinks)")
    return chosen, seeds


def confirmed_before(config: StudyConfig) -> dict[int, set[int]]:
    """Candidate trial -> the seeds of its complete confirmation runs, from earlier launches (read only)."""
    try:
        study = optuna.load_study(study_name=stage_name(config.study.name), storage=config.study.storage)
    except KeyError:
        return {}  # no confirmation yet
    done: dict[int, set[int]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        done.setdefault(int(t.user_attrs[CANDIDATE_ATTR]), set()).add(int(t.user_attrs[TRAIN_SEED_ATTR]))
    return done


def earlier_candidate(search: optuna.Study, config: StudyConfig, number: int) -> Candidate:
    """A candidate an earlier launch confirmed, labelled as :func:`candidates` labels it."""
    trial = next(t for t in search.get_trials(deepcopy=False) if t.number == number)
    preset = next((i for i, point in enumerate(config.enqueue) if runs_point(trial, point)), None)
    return _candidate(trial, f"trial {number}" if preset is None else preset_label(preset, number), preset)


def check_candidate_folders(config: StudyConfig, search: optuna.Study, chosen: list[Candidate]) -> None:
    """The champion is registered from its search run's checkpoint: a candidate whose run folder lost it is
    refused now, before the confirmation trains anything, not when publishing fails after it."""
    if not registered_name(config):
        return  # nothing will be registered: the confirmation needs only the study's storage
    for candidate in chosen:
        folder = best_run_folder(search, candidate.trial, config.study_dir)
        folder = folder or config.study_dir / trial_name(candidate.trial)
        if not (folder / CHECKPOINT_FILE).is_file():
            raise ValueError(
                f"{candidate.label}'s run folder {folder} has no {CHECKPOINT_FILE} (was {config.study_dir} moved "
                "or deleted?): the champion is registered from it, so a confirmation now would train for "
                f'nothing; restore the folder, or set [study].registered_model = "" to confirm without registering'
            )


def pending(stage: Stage) -> bool:
    """Whether some queued run is still to finish."""
    return count_finished(stage.study) < stage.config.study.n_trials


def run_stage(
    config: StudyConfig, search: optuna.Study, annotated: AnnotatedImages, progress: bool, stop: StopRequest
) -> tuple[Stage, TrialsEnded, dict[str, Any]]:
    """Prepare the confirmation, run its queued runs in this worker until none is left (or a stop), report.

    The report is written whatever this worker ran (a relaunch of a finished confirmation rewrites it and
    trains nothing); it goes to the study's parent run when this worker ran confirmation runs.
    """
    with launch_lock(config.study_dir):
        stage = prepare_stage(config, search)
        parent = open_parent_run(search, config) if pending(stage) else None
    ended = TrialsEnded()
    if parent is None:
        report, _ = write_confirm_report(stage, config.study_dir)
        return stage, ended, report
    status = "KILLED"
    try:
        ended = run_trials(stage.study, stage.config, annotated, parent, progress, stop)
        report, paths = write_confirm_report(stage, config.study_dir)
        metrics, tags = parent_figures(report)
        parent.log_metrics(metrics, step=0)
        parent.set_tags(tags)
        for path in paths:
            parent.log_artifact(path)
        status = "FINISHED"
    finally:
        parent.end(status)
    return stage, ended, report
