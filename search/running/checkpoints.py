"""Checkpoints that fit on a disk: ``[study] keep_checkpoints = N`` and the disk a study's runs use.

A full checkpoint holds the weights and both Adam states (about three times the weights). Once a
trial has finished it is never resumed, so for all but the N best complete trials the checkpoint is
rewritten with the weights only (for a raced configuration: every seed run's, ``trial-<c>/seed-<s>/``):
every report, ``mbu eval``, ``mbu transfer`` and ``mbu remove`` still works on it. Kept in full: the
N best complete trials, every running trial, and every failed trial whose retry has not finished
(the retry resumes from it). ``0`` (the default) keeps all.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.search.judging.race import configuration_number, incumbent, seed_count, seed_values
from mbu.search.running.trial import trial_dir
from mbu.search.studyfile.study_file import StudyConfig
from mbu.train.checkpoint import CheckpointError, keep_weights_only

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def folders_to_thin(study: optuna.Study, keep: int) -> list[int]:
    """Trial numbers whose checkpoints may lose their optimizer state, with ``keep`` best complete kept."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    complete.sort(key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    k = seed_count(study)
    if k > 1:  # a race: the incumbent, then configurations with all k seeds; seed folders are under the first try's
        holder = incumbent(study)
        complete.sort(key=lambda t: (holder is None or t.number != holder.number, len(seed_values(t)) < k))
    kept = {t.number for t in complete[:keep]} | {configuration_number(t) for t in complete[:keep] if k > 1}
    done: set[int] = set()
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        for trial in trials:
            if trial.state in FINISHED:
                done.add(trial.number)
                # The failed tries it retried were resumed from and are done with, whatever it kept.
                done.update(RetryHeartbeatStaleTrialCallback.retry_history(trial))
    return sorted(done - kept)


def thin_checkpoints(study: optuna.Study, config: StudyConfig) -> int:
    """Apply ``keep_checkpoints`` to the study's run folders now; the bytes freed (0 when it keeps all)."""
    keep = config.study.keep_checkpoints
    if keep <= 0:
        return 0
    freed = 0
    for number in folders_to_thin(study, keep):
        folder = trial_dir(config, number)
        for path in [folder / CHECKPOINT_FILE, *sorted(folder.glob(f"seed-*/{CHECKPOINT_FILE}"))]:
            if not path.is_file():
                continue
            try:
                freed += keep_weights_only(path)
            except (CheckpointError, OSError) as err:  # unreadable, or no room to rewrite it: left as is, and said
                warnings.warn(f"trial {number}: checkpoint {path} not thinned: {err}", stacklevel=2)
    return freed
