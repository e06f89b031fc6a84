"""A worker's trials loop: ask Optuna for trials, run them, tell it how each ended, until the target.

A launch (one worker) runs until the study has ``n_trials`` finished trials
(complete or pruned). Failed trials do not count; after ``max_failures``
failed trials in a row the launch stops. Several workers, here or on other
machines, may run one study at once: each takes the next trial while finished
plus running trials are short of the target, so they stop at it (two workers
asking for the very last trial at the same instant can both get one).

A worker holds up to ``population`` trials at once (:mod:`.population`).

Where each concern lives: ``storage`` (Optuna storage, sampler, pruner,
heartbeats, counts), ``study`` (opening a study: fingerprint, presets, run
folder), ``trial`` (one trial's training and scoring, no MLflow),
``population`` (a worker's trials in flight, stepped in turn), ``tracking``
(MLflow parent and trial runs), ``launch`` (options, preparing a study, launchers),
``workers`` (launch lock, worker processes),
``study_report`` (summary, ranked trials, plots).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna

from mbu.data.images import AnnotatedImages
from mbu.search.launching.sampler import record_draw
from mbu.search.launching.storage import (
    Heartbeats,
    count_finished,
    count_taken,
    count_waiting,
    heartbeat_ages,
)
from mbu.search.running.checkpoints import FINISHED, thin_checkpoints
from mbu.search.running.population import Outcome, Population
from mbu.search.running.tracking import RUN_TAGS_ATTR
from mbu.search.running.trial import frozen_trial
from mbu.search.studyfile.study_file import StudyConfig, StudySettings
from mbu.train.stop import StopRequest
from mbu.train.tracking import Recorder

WORKER_ATTR = "worker"  # Optuna trial attribute: host:pid of the worker process that ran it


@dataclass
class TrialsEnded:
    """What a worker's trials loop saw: its failed trials and why it stopped short of the target, if it did."""

    failed: list[tuple[int, str]] = field(default_factory=list)  # (trial number, error)
    on_failures: bool = False  # max_failures failed trials in a row
    stopped_by: str | None = None  # the reason the stop request gave


def run_trials(
    study: optuna.Study,
    config: StudyConfig,
    annotated: AnnotatedImages,
    parent: Recorder,
    progress: bool,
    stop: StopRequest,
) -> TrialsEnded:
    """Ask, run, tell, with up to ``population`` trials in flight, until the target is taken (or a stop)."""
    settings = config.study
    ended = TrialsEnded()
    in_a_row = 0

    def record(outcome: Outcome) -> None:
        nonlocal in_a_row
        heartbeats.remove(outcome.trial)
        if outcome.state == optuna.trial.TrialState.FAIL:
            ended.failed.append((outcome.number, outcome.error))
            print(f"trial {outcome.number} failed: {outcome.error}", file=sys.stderr, flush=True)
        in_a_row = in_a_row + 1 if outcome.state == optuna.trial.TrialState.FAIL else 0
        # Once that many failed in a row the worker asks for no more, even if a trial in flight completes.
        ended.on_failures = ended.on_failures or in_a_row >= settings.max_failures
        if outcome.state in FINISHED:
            thin_checkpoints(study, config)

    told: set[tuple] = set()  # trials running elsewhere that this worker has already spoken of
    population = Population(study, config, annotated, parent, progress)
    with Heartbeats(study, settings.heartbeat_interval) as heartbeats:
        try:
            while True:
                while not population.full and stop() is None and not ended.on_failures:
                    if count_taken(study) >= settings.n_trials or (config.queued_only and not count_waiting(study)):
                        break
                    trial = ask(study)
                    if config.queued_only and not from_queue(study, trial):
                        break  # another worker took the last queued trial first: this one is failed, never run
                    if config.queued_only:
                        announce(study, trial, settings)
                    heartbeats.add(trial)
                    outcome = population.start(trial)
                    if outcome is not None:
                        record(outcome)
                if stop() is not None:
                    for outcome in population.stop(stop()):
                        record(outcome)
                    ended.stopped_by = stop()
                    break
                if not population.slots:
                    wait = None if ended.on_failures else wait_for_lost_workers(study, settings, told)
                    if wait is None:
                        break
                    # Wake as soon as the other workers finish the study, not at the end of the wait.
                    pause(wait, stop, until=lambda: count_finished(study) >= settings.n_trials)
                    continue
                for outcome in population.advance(stop):
                    record(outcome)
        except BaseException as err:  # Ctrl-C, a storage error: no trial of this worker is left RUNNING
            population.abandon(err)
            raise
        finally:
            population.close()
    ended.on_failures = ended.on_failures and ended.stopped_by is None and count_taken(study) < settings.n_trials
    return ended


def announce(study: optuna.Study, trial: optuna.Trial, settings: StudySettings) -> None:
    """Say which queued run starts, and which of how many (a confirmation run: its candidate and seed)."""
    tags = trial.user_attrs.get(RUN_TAGS_ATTR, {})
    what = f"{tags['candidate']}, seed {tags['seed']}" if "candidate" in tags else f"trial {trial.number}"
    print(f"{tags.get('stage', 'queued')} run {count_taken(study)} of {settings.n_trials}: {what}", flush=True)


def wait_for_lost_workers(study: optuna.Study, settings: StudySettings, told: set[tuple]) -> float | None:
    """Seconds to wait for a silent worker's trial to become retryable; None when this worker is done.

    Reached when the target is taken but not finished: the missing trials run in other workers. A
    trial whose worker is alive is left to it; one whose worker has been silent (killed, say) is
    retried once the grace period has passed, and this worker waits for that rather than exiting
    short of the target.
    """
    if count_finished(study) >= settings.n_trials:
        return None
    ages = heartbeat_ages(study)
    silent = {number: age for number, age in ages.items() if age > 2 * settings.heartbeat_interval}
    if not silent:
        if not ages:
            return None
        # A fresh heartbeat may be a worker's last: look again once a silent one would show.
        if ("checked", *sorted(ages)) not in told:
            told.add(("checked", *sorted(ages)))
            return 2 * settings.heartbeat_interval - max(ages.values()) + 1
        running = ", ".join(str(n) for n in sorted(ages))
        print(f"mbu search: trial {running} running in another worker (heartbeats fresh); it finishes the study")
        return None
    number = min(silent, key=lambda n: settings.grace_period - silent[n])
    left = max(1.0, settings.grace_period - silent[number] + 1)
    if ("silent", number) not in told:
        told.add(("silent", number))
        print(
            f"mbu search: trial {number} is RUNNING but its worker has been silent for {silent[number]:.0f} s; "
            f"it is failed and retried after the grace period ([study].grace_period = {settings.grace_period} s), "
            f"in about {left:.0f} s: waiting",
            flush=True,
        )
    return left


def pause(seconds: float, stop: Callable[[], str | None], until: Callable[[], bool] = lambda: False) -> None:
    """Sleep, waking early for a stop or once ``until()`` holds (checked every 2 s: it may query the storage)."""
    deadline = time.monotonic() + seconds
    checked = time.monotonic()
    while stop() is None and time.monotonic() < deadline:
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        if time.monotonic() - checked >= 2.0:
            if until():
                return
            checked = time.monotonic()


def from_queue(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether the trial came from the queue; a sampled one of a queued-only study is failed at once."""
    if "fixed_params" in frozen_trial(trial).system_attrs:
        return True
    trial.set_user_attr("error", "nothing left to run: another worker took the last queued trial")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return False


def ask(study: optuna.Study) -> optuna.Trial:
    """The next trial (a queued preset or retry first); this worker beats for it itself (:class:`Heartbeats`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    record_draw(trial)
    return trial
