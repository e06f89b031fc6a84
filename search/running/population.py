"""K trials in one worker process: a population of slots, each holding one trial, stepped in turn.

Each trial keeps everything a trial has on its own: its model, optimizers and
batches (a function of its seed and iteration), its checkpoint in the
single-trial format, its MLflow run, its evaluations, pruning and report. The
slots share only the decoded training data. A trial that completes, is pruned
or fails leaves its slot to the next asked trial, so slots run at their own
iterations.

How the slots share the device:

- on CPU they run one after another, each for a stretch of iterations up to
  its next loss log: the same work as trials run one after another, in the
  same order of operations (measured in ``bench/population.py``);
- on CUDA each slot steps one iteration at a time on its own stream, so the K
  steps (each launched by the host in turn) overlap on the GPU; with
  ``cuda_graph`` a step is one graph replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.data.images import AnnotatedImages
from mbu.search.judging.race import (
    OUTCOME_ATTR,
    SEED_FIGURES,
    configuration_number,
    finish_configuration,
    is_racing,
    next_seed,
    race_seeds,
    record_seed,
    report_carried,
    seed_folder,
    seed_runs,
)
from mbu.search.running.tracking import (
    OPEN_SEED_RUN_ATTR,
    RUN_ID_ATTR,
    STOPS_ATTR,
    close_trial_run,
    open_trial_run,
    queue_retry,
)
from mbu.search.running.trial import (
    OBJECTIVE_KEY,
    RunCollapsed,
    frozen_trial,
    record_collapse,
    sampled_config,
    score_run,
    score_trial,
    start_training,
    trial_dir,
)
from mbu.search.studyfile.study_file import StudyConfig, trial_name
from mbu.train.checkpoint import CheckpointError, check_resumable, load_checkpoint
from mbu.train.config import TrainConfig
from mbu.train.loop import Training, TrainingData, data_key
from mbu.train.step import NonFiniteLossError, resolve_device
from mbu.train.stop import interrupts_held
from mbu.train.tracking import Recorder

StopCheck = Callable[[], "str | None"]  # the reason to stop this worker, or None to go on


@dataclass
class Outcome:
    """How a trial of this worker ended."""

    trial: optuna.Trial
    state: optuna.trial.TrialState  # COMPLETE, PRUNED or FAIL
    error: str = ""  # for FAIL

    @property
    def number(self) -> int:
        return self.trial.number


class Slot:
    """One trial of the population, from its MLflow run to Optuna's verdict."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, stream: torch.cuda.Stream | None) -> None:
        self.study = study
        self.trial = trial
        self.stream = stream
        self.run: Recorder | None = None
        self.training: Training | None = None
        self.told = False  # Optuna has this trial's verdict: nothing more may be recorded for it
        self.stepped = 0  # training iterations this slot has run (the population's progress bar)

    def tell(self, state: optuna.trial.TrialState, value: float | None = None) -> None:
        self.study.tell(self.trial, value, state=state)
        self.told = True

    def on_stream(self) -> contextlib.AbstractContextManager:
        """Everything of this trial (allocations included) on its own CUDA stream; nothing on CPU."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def start(self, population: Population) -> Outcome | None:
        """Open the trial's run and build its training; an outcome if it failed already."""
        try:
            cfg = sampled_config(self.trial, population.config)
            with interrupts_held():  # a Ctrl-C here would leave the new run RUNNING, its id lost
                self.run = open_trial_run(self.trial, population.config, cfg, population.parent)
            with self.on_stream():
                data = population.data_for(cfg)
                self.training = start_training(
                    self.trial, cfg, population.annotated, self.run, population.bar_per_trial, data,
                    guard=population.config.race,  # [race] with seeds = 1: the collapse guard alone
                )  # fmt: skip
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)
        return None

    def train_for(self, iterations: int, stop: StopCheck) -> bool:
        """Up to ``iterations`` training steps (fewer once a stop is asked); whether the training is done."""
        for _ in range(iterations):
            if self.training.done or stop() is not None:
                break
            self.training.step()
            self.stepped += 1
        return self.training.done

    def train_or_collapse(self, iterations: int, stop: StopCheck) -> tuple[bool, RunCollapsed | None]:
        """:meth:`train_for`, where the collapse guard ([race]) ending the run counts as done: (done, the collapse)."""
        try:
            return self.train_for(iterations, stop), None
        except RunCollapsed as err:  # the run ends here, scored as it is
            return True, err

    def advance(self, iterations: int, annotated: AnnotatedImages, stop: StopCheck) -> Outcome | None:
        """Up to ``iterations`` training steps (fewer once a stop is asked); the outcome once the trial ends."""
        try:
            with self.on_stream():
                done, collapsed = self.train_or_collapse(iterations, stop)
                if not done:
                    return None
                value = score_trial(self.trial, self.training, annotated, self.run)
            if collapsed is not None:
                record_collapse(self.trial, self.run, collapsed)
        except optuna.TrialPruned:
            self.training.close()
            close_trial_run(self.run, self.trial, "PRUNED")
            self.tell(optuna.trial.TrialState.PRUNED)
            return Outcome(self.trial, optuna.trial.TrialState.PRUNED)
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)
        close_trial_run(self.run, self.trial, "COMPLETE")
        self.tell(optuna.trial.TrialState.COMPLETE, value)
        return Outcome(self.trial, optuna.trial.TrialState.COMPLETE)

    def fail(self, err: BaseException) -> Outcome:
        """Record the trial FAIL with the exception that ended it; Ctrl-C is passed on once recorded."""
        return self.record_failure(f"{type(err).__name__}: {err}", err)

    def record_failure(self, error: str, err: BaseException | None = None) -> Outcome:
        """Record the trial FAIL with ``error`` (never left RUNNING); a KeyboardInterrupt ``err`` is re-raised."""
        if self.training is not None:
            self.training.close()
        if self.run is not None:
            close_trial_run(self.run, self.trial, "FAIL", error)
        self.trial.set_user_attr("error", error[:1000])
        self.tell(optuna.trial.TrialState.FAIL)
        if isinstance(err, KeyboardInterrupt):
            raise err
        return Outcome(self.trial, optuna.trial.TrialState.FAIL, error)

    def stop(self, reason: str) -> Outcome:
        """Checkpoint now, record the trial FAIL and queue its retry, which resumes from that checkpoint.

        A stop from outside (SIGTERM, a time limit, preemption) is no fault of the trial: its retry is
        queued whatever ``max_retry`` says, so a long trial survives any number of scheduler slots.
        """
        iteration = 0
        if self.training is not None:
            with self.on_stream():
                self.training.save()
            iteration = self.training.iteration
        self.trial.set_user_attr(STOPS_ATTR, int(self.trial.user_attrs.get(STOPS_ATTR, 0)) + 1)
        outcome = self.record_failure(f"stopped: {reason}; checkpoint at iteration {iteration}, queued to resume")
        queue_retry(self.study, frozen_trial(self.trial))
        return outcome


class RacingSlot(Slot):
    """One configuration of a race (``search.judging.race``): its seeds trained in turn in this slot, each its own run.

    The configuration's MLflow run (``trial-<c>``) holds its parameters and race figures; each seed run
    (``trial-<c> seed-<s>``, folder ``trial-<c>/seed-<s>/``) is nested under it. ``c`` is the first try
    of the trial's chain of retries, so a retry continues the same folders and reopens the same runs.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, stream: torch.cuda.Stream | None) -> None:
        super().__init__(study, trial, stream)
        self.seed: int | None = None  # the seed in training
        self.seed_run: Recorder | None = None
        self.population: Population | None = None
        self.number = trial.number  # the configuration: the first try of the trial's chain of retries
        self.folder = Path()  # runs/<study>/trial-<c>/

    def start(self, population: Population) -> Outcome | None:
        self.population = population
        config = population.config
        try:
            number = self.number = configuration_number(frozen_trial(self.trial))
            self.folder = trial_dir(config, number)
            cfg = replace(sampled_config(self.trial, config), load=None, out=str(self.folder.resolve()))
            self.base_cfg = cfg
            tags = {"configuration": number, "race_seeds": len(population.seeds)}
            with interrupts_held():  # a Ctrl-C here would leave the new run RUNNING, its id lost
                self.run = open_trial_run(
                    self.trial, config, cfg, population.parent, reopen=self.trial.user_attrs.get(RUN_ID_ATTR), tags=tags
                )
            report_carried(self.trial)
            return self.next_or_finish()
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)

    def next_or_finish(self) -> Outcome | None:
        """Train the next seed the race grants, or end the configuration's race."""
        seed = next_seed(self.study, self.population.config, self.trial)
        if seed is None:
            return self.finish()
        self.start_seed(seed)
        return None

    def start_seed(self, seed: int) -> None:
        population, number = self.population, self.number
        folder = self.folder / f"seed-{seed}"
        resume = resumable(folder)
        out = str(folder.resolve())
        cfg = replace(self.base_cfg, seed=seed, out=out, load=out if resume is not None else None)
        # The run of an earlier try of this seed continues where its checkpoint does; with no checkpoint to
        # resume, the seed starts again in a new run (the earlier one stays FAILED, its steps not overwritten).
        carried = self.trial.user_attrs.get(OPEN_SEED_RUN_ATTR) or {}
        reopen = carried.get("run_id") if carried.get("seed") == seed and resume is not None else None

        def remember(run_id: str) -> None:
            self.trial.set_user_attr(OPEN_SEED_RUN_ATTR, {"seed": seed, "run_id": run_id})

        tags = {"configuration": number, "seed": seed, "stage": "race"}
        name = f"{trial_name(number)} seed-{seed}"
        with interrupts_held():
            self.seed_run = open_trial_run(self.trial, population.config, cfg, self.run, name, reopen, tags, remember)
        self.seed = seed
        if resume is not None:
            self.seed_run.set_tags({"resumed_from_iteration": resume})
        with self.on_stream():
            data = population.data_for(cfg)
            self.training = start_training(
                self.trial, cfg, population.annotated, self.seed_run, population.bar_per_trial, data,
                guard=population.config.race, report=False,
            )  # fmt: skip

    def advance(self, iterations: int, annotated: AnnotatedImages, stop: StopCheck) -> Outcome | None:
        try:
            with self.on_stream():
                try:
                    done, collapsed = self.train_or_collapse(iterations, stop)
                except NonFiniteLossError as err:  # a diverged seed is that seed's (worst) result, not a crash
                    self.end_diverged_seed(err)
                    return self.next_or_finish()
                if not done:
                    return None
                metrics = score_run(self.training, annotated, self.seed_run)
            self.end_seed(metrics, collapsed)
            return self.next_or_finish()
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)

    def end_seed(self, metrics: dict[str, float], collapsed: RunCollapsed | None) -> None:
        """The seed's figures kept on the trial and on the configuration's run; its own run closed."""
        value = metrics[OBJECTIVE_KEY]
        run = {key: metrics.get(key) for key in SEED_FIGURES}
        run |= {
            "value": value,
            "collapsed": str(collapsed) if collapsed else None,
            "iteration": self.training.iteration,
        }
        run |= {"dir": seed_folder(self.number, self.seed), "run_id": self.seed_run.run_id}
        self.keep_seed(run)
        if collapsed is not None:
            self.seed_run.set_tags({"collapsed": str(collapsed)})
        self.close_seed("COMPLETE")

    def end_diverged_seed(self, err: NonFiniteLossError) -> None:
        """A seed whose loss went NaN or infinite: the worst value, so the race and the sampler count it."""
        worst = 0.0 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        reason = f"diverged: {err}"
        run = {"value": worst, "collapsed": reason, "iteration": self.training.iteration}
        self.keep_seed(run | {"dir": seed_folder(self.number, self.seed), "run_id": self.seed_run.run_id})
        self.close_seed("FAIL", reason)

    def keep_seed(self, run: dict) -> None:
        """The finished seed on the trial, and no longer the seed run in flight (a lost worker's retry skips it)."""
        record_seed(self.trial, self.seed, run)
        self.trial.set_user_attr(OPEN_SEED_RUN_ATTR, None)
        self.run.log_metrics({"race/seed_value": run["value"]}, step=self.seed)

    def close_seed(self, state: str, error: str = "") -> None:
        self.training.close()
        close_trial_run(self.seed_run, self.trial, state, error)
        self.training, self.seed_run, self.seed = None, None, None

    def finish(self) -> Outcome:
        """The race of this configuration is over: its mean told to Optuna."""
        result = finish_configuration(self.trial, self.population.config)
        self.trial.set_user_attr(OPEN_SEED_RUN_ATTR, None)  # e.g. a retry raced out before its carried seed
        seeds = len(seed_runs(self.trial))
        self.run.log_metrics({**result.figures, "race/seeds_run": float(seeds)}, step=0)
        self.run.set_tags({OUTCOME_ATTR: result.outcome})
        close_trial_run(self.run, self.trial, "COMPLETE")
        self.tell(optuna.trial.TrialState.COMPLETE, result.value)
        return Outcome(self.trial, optuna.trial.TrialState.COMPLETE)

    def record_failure(self, error: str, err: BaseException | None = None) -> Outcome:
        if self.seed_run is not None:  # the seed run in flight: its retry reopens and resumes it
            close_trial_run(self.seed_run, self.trial, "FAIL", error)
        return super().record_failure(error, err)


def resumable(folder: Path) -> int | None:
    """The iteration of a seed folder's checkpoint that a retry can resume from, or None."""
    if not (folder / CHECKPOINT_FILE).is_file():
        return None
    try:
        state = load_checkpoint(folder)
        check_resumable(state, folder)
    except CheckpointError:
        return None  # unreadable or weights only: the seed trains again from the start
    return int(state["iteration"])


class Population:
    """The worker's slots on one device, and the training data they share."""

    def __init__(
        self, study: optuna.Study, config: StudyConfig, annotated: AnnotatedImages, parent: Recorder, progress: bool
    ) -> None:
        self.study = study
        self.config = config
        self.annotated = annotated
        self.parent = parent
        self.size = config.study.population
        self.device = resolve_device(str(config.train.get("device", "auto")), config.train.get("gpu"))
        # One bar per trial reads well for one trial; a population shows one bar of all its iterations.
        self.bar_per_trial = progress and self.size == 1
        self.bar = tqdm(desc="population", unit="it", disable=not progress or self.size == 1, dynamic_ncols=True)
        self.slots: list[Slot] = []
        self.free_streams = [torch.cuda.Stream(self.device) for _ in range(self.size)] if self._cuda else []
        self._data: dict[tuple, TrainingData] = {}
        self.slot_type = RacingSlot if is_racing(config) else Slot
        self.seeds = race_seeds(config)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def data_for(self, cfg: TrainConfig) -> TrainingData:
        """Decoded once per worker, shared by all its trials (they share size and root)."""
        key = data_key(cfg)
        if key not in self._data:
            self._data[key] = TrainingData.load(cfg, resolve_device(cfg.device, cfg.gpu), self.bar_per_trial)
        return self._data[key]

    @property
    def full(self) -> bool:
        return len(self.slots) >= self.size

    def start(self, trial: optuna.Trial) -> Outcome | None:
        """The trial in a free slot; its outcome if it failed before training."""
        slot = self.slot_type(self.study, trial, self.free_streams.pop() if self._cuda else None)
        self.slots.append(slot)
        outcome = slot.start(self)  # on Ctrl-C the slot stays for abandon() (which skips it once told)
        if outcome is not None:
            self._release(slot)
        return outcome

    def advance(self, stop: StopCheck) -> list[Outcome]:
        """One round: each slot steps (CPU: up to its next loss log; CUDA: one iteration); the trials that ended."""
        ended = []
        for slot in list(self.slots):
            before = slot.stepped
            chunk = 1 if self._cuda else slot.training.iterations_to_next_log()
            outcome = slot.advance(chunk, self.annotated, stop)
            if outcome is not None:
                self._release(slot)
                ended.append(outcome)
            self.bar.update(slot.stepped - before)
            self.bar.set_postfix(trials=",".join(str(s.trial.number) for s in self.slots), refresh=False)
        return ended

    def stop(self, reason: str) -> list[Outcome]:
        """Every trial checkpointed, recorded FAIL and queued to resume (a signal asked this worker to stop)."""
        outcomes = []
        for slot in list(self.slots):
            try:
                outcomes.append(slot.stop(reason))
            except Exception as err:  # e.g. the checkpoint could not be written: never leave the trial RUNNING
                if not slot.told:
                    outcomes.append(slot.fail(err))
            self._release(slot)
        return outcomes

    def abandon(self, err: BaseException) -> None:
        """The worker is going down (Ctrl-C, a storage error): every trial not yet told is recorded FAIL.

        Each on its own, so one that cannot be recorded leaves the others recorded (a live worker
        later fails and retries it through its stale heartbeat).
        """
        for slot in list(self.slots):
            if not slot.told:
                try:
                    slot.fail(err)
                except BaseException:  # the error that brought the worker down is raised next
                    pass
            self._release(slot)

    def _release(self, slot: Slot) -> None:
        self.slots.remove(slot)
        if slot.stream is not None:
            self.free_streams.append(slot.stream)

    def close(self) -> None:
        self.bar.close()
