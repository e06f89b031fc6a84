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
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.data.images import AnnotatedImages
from mbu.search.judging.race import (
    CROWNED_ATTR,
    OUTCOME_ATTR,
    SEED_FIGURES,
    configuration_number,
    crown_seeds,
    finish_configuration,
    is_racing,
    next_seed,
    race_seeds,
    record_seed,
    report_carried,
    seed_folder,
    seed_plan,
    seed_runs,
)
from mbu.search.running.tracking import (
    OPEN_SEED_RUN_ATTR,
    PENDING_SEEDS_ATTR,
    RUN_ID_ATTR,
    STOPS_ATTR,
    close_trial_run,
    open_seed_runs,
    open_trial_run,
    pending_results,
    queue_retry,
    set_seed_entry,
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

    @property
    def width(self) -> int:
        """Places of the population this slot holds."""
        return 1

    def chunk(self, cuda: bool) -> int:
        """Iterations per turn: one on CUDA (the slots' steps overlap), up to the next loss log on CPU."""
        return 1 if cuda else self.training.iterations_to_next_log()

    def train_for(self, iterations: int, stop: StopCheck, training: Training | None = None) -> bool:
        """Up to ``iterations`` steps of ``training`` (the slot's by default; fewer once a stop is asked);
        whether it is done."""
        training = training or self.training
        for _ in range(iterations):
            if training.done or stop() is not None:
                break
            training.step()
            self.stepped += 1
        return training.done

    def train_or_collapse(
        self, iterations: int, stop: StopCheck, training: Training | None = None
    ) -> tuple[bool, RunCollapsed | None]:
        """:meth:`train_for`, where the collapse guard ([race]) ending the run counts as done: (done, the collapse)."""
        try:
            return self.train_for(iterations, stop, training), None
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

    def save(self) -> int:
        """Checkpoint the training now; the iteration saved."""
        if self.training is None:
            return 0
        with self.on_stream():
            self.training.save()
        return self.training.iteration

    def stop(self, reason: str) -> Outcome:
        """Checkpoint now, record the trial FAIL and queue its retry, which resumes from that checkpoint.

        A stop from outside (SIGTERM, a time limit, preemption) is no fault of the trial: its retry is
        queued whatever ``max_retry`` says, so a long trial survives any number of scheduler slots.
        """
        iteration = self.save()
        self.trial.set_user_attr(STOPS_ATTR, int(self.trial.user_attrs.get(STOPS_ATTR, 0)) + 1)
        outcome = self.record_failure(f"stopped: {reason}; checkpoint at iteration {iteration}, queued to resume")
        queue_retry(self.study, frozen_trial(self.trial))
        return outcome


@dataclass
class SeedLane:
    """One seed run of a raced configuration: its MLflow run and training, on its own CUDA stream."""

    seed: int
    run: Recorder
    training: Training | None  # None until it is built, and once its result is in
    stream: torch.cuda.Stream | None
    borrowed: bool  # it holds a place of the population beyond its slot's own (and that place's stream)
    result: dict | None = None  # its figures once trained, kept until the race grants this seed

    def on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


class RacingSlot(Slot):
    """One configuration of a race (``search.judging.race``): its seeds trained in this slot, each its own run.

    The configuration's MLflow run (``trial-<c>``) holds its parameters and race figures; each seed run
    (``trial-<c> seed-<s>``, folder ``trial-<c>/seed-<s>/``) is nested under it. ``c`` is the first try
    of the trial's chain of retries, so a retry continues the same folders and reopens the same runs.

    Each seed in training is a lane. With ``[race] side_by_side`` the slot widens into the population's
    free places and trains the next seeds of its plan ahead of the race's decisions, side by side (on a
    GPU, at about the time of one); a finished seed waits until the race grants it, in seed order, and a
    seed the race does not grant (the configuration was raced out first) is cancelled: its MLflow run
    deleted and its folder removed, so each granted seed is recorded once. Without it there is one lane,
    always the seed the race granted.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, stream: torch.cuda.Stream | None) -> None:
        super().__init__(study, trial, stream)
        self.lanes: list[SeedLane] = []
        self.population: Population | None = None
        self.number = trial.number  # the configuration: the first try of the trial's chain of retries
        self.folder = Path()  # runs/<study>/trial-<c>/

    def seed_folder(self, seed: int) -> str:
        """The seed run's folder relative to ``runs/<study>/`` (as kept on the trial)."""
        return seed_folder(self.number, seed)

    def seed_dir(self, seed: int) -> Path:
        """The seed run's folder: ``runs/<study>/trial-<c>/seed-<s>/``."""
        return self.folder.parent / self.seed_folder(seed)

    @property
    def width(self) -> int:
        """Places of the population this slot holds: its own, and one per lane on a borrowed place."""
        return 1 + sum(lane.borrowed for lane in self.lanes)

    def start(self, population: Population) -> Outcome | None:
        self.population = population
        config = population.config
        try:
            number = self.number = configuration_number(frozen_trial(self.trial))
            self.folder = trial_dir(config, number)
            cfg = replace(sampled_config(self.trial, config), load=None, out=str(self.folder.resolve()))
            self.base_cfg = cfg
            tags = {"configuration": number, "race_seeds": len(population.seeds), "crown_seeds": len(population.crown)}
            with interrupts_held():  # a Ctrl-C here would leave the new run RUNNING, its id lost
                self.run = open_trial_run(
                    self.trial, config, cfg, population.parent, reopen=self.trial.user_attrs.get(RUN_ID_ATTR), tags=tags
                )
            report_carried(self.trial)
            return self.next_or_finish()
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)

    def next_or_finish(self, widen: bool = True) -> Outcome | None:
        """Record the finished seeds the race grants, in seed order; then end the race, or (``widen``) start
        the lanes the slot may hold: the granted seed if it has none, and with side_by_side the next of its plan.
        """
        config = self.population.config
        while (seed := next_seed(self.study, config, self.trial)) is not None:
            pending = pending_results(self.trial).get(seed)
            if pending is None:
                break
            self.keep_seed(seed, pending)
        if seed is None:
            return self.finish()
        if not widen:
            return None
        running = {lane.seed for lane in self.lanes}
        want = self.population.lanes_for(self) - len(self.lanes)
        starts = [] if seed in running or want < 1 else [seed]
        if want > len(starts):  # side_by_side with places free: the plan's next seeds, ahead of the race
            done = seed_runs(self.trial)
            later = [s for s in seed_plan(self.study, config, self.trial) if s > seed]
            starts += [s for s in later if s not in done and s not in running][: want - len(starts)]
        for next_up in starts:
            self.start_lane(next_up)
        return None

    def start_lane(self, seed: int) -> None:
        population, number = self.population, self.number
        folder = self.seed_dir(seed)
        resume = resumable(folder)
        out = str(folder.resolve())
        cfg = replace(self.base_cfg, seed=seed, out=out, load=out if resume is not None else None)
        # The run of an earlier try of this seed continues where its checkpoint does; with no checkpoint to
        # resume, the seed starts again in a new run (the earlier one stays FAILED, its steps not overwritten).
        reopen = open_seed_runs(self.trial).get(seed) if resume is not None else None

        def remember(run_id: str) -> None:
            set_seed_entry(self.trial, OPEN_SEED_RUN_ATTR, seed, run_id)

        stage = "crown" if seed in population.crown else "race"
        tags = {"configuration": number, "seed": seed, "stage": stage}
        name = f"{trial_name(number)} seed-{seed}"
        # On the slot's own place while no lane holds it, else on a free place of the population (its stream).
        borrowed = any(not lane.borrowed for lane in self.lanes)
        stream = population.take_stream() if borrowed else self.stream
        try:
            with interrupts_held():
                run = open_trial_run(self.trial, population.config, cfg, self.run, name, reopen, tags, remember)
        except BaseException:
            if borrowed and stream is not None:
                population.give_stream(stream)
            raise
        lane = SeedLane(seed, run, None, stream, borrowed)
        self.lanes.append(lane)
        if resume is not None:
            run.set_tags({"resumed_from_iteration": resume})
        with lane.on_stream():
            data = population.data_for(cfg)
            lane.training = start_training(
                self.trial, cfg, population.annotated, run, population.bar_per_trial, data,
                guard=population.config.race, report=False,
            )  # fmt: skip

    def chunk(self, cuda: bool) -> int:
        """Ignored by :meth:`advance`: each lane steps up to its own next loss log (CPU) or one iteration (CUDA)."""
        return 1

    def advance(self, iterations: int, annotated: AnnotatedImages, stop: StopCheck) -> Outcome | None:
        try:
            training = [lane for lane in self.lanes if lane.result is None]
            for lane in training:
                self.advance_lane(lane, annotated, stop)
            finished = any(lane.result is not None for lane in training)
            # The race is asked again when a seed finished, or when side_by_side has places to fill: not on
            # every round (each asking reads the study's trials from storage).
            if finished or (self.population.side_by_side and not self.population.full):
                return self.next_or_finish(widen=stop() is None)
            return None
        except (Exception, KeyboardInterrupt) as err:
            return self.fail(err)

    def advance_lane(self, lane: SeedLane, annotated: AnnotatedImages, stop: StopCheck) -> None:
        """Train one lane up to its next loss log (CPU) or one iteration (CUDA); its result once it is done."""
        steps = 1 if lane.stream is not None else lane.training.iterations_to_next_log()
        with lane.on_stream():
            try:
                done, collapsed = self.train_or_collapse(steps, stop, lane.training)
            except NonFiniteLossError as err:  # a diverged seed is that seed's (worst) result, not a crash
                self.end_diverged_lane(lane, err)
                return
            if not done:
                return
            metrics = score_run(lane.training, annotated, lane.run)
        value = metrics[OBJECTIVE_KEY]
        result = {key: metrics.get(key) for key in SEED_FIGURES}
        result |= {
            "value": value,
            "collapsed": str(collapsed) if collapsed else None,
            "iteration": lane.training.iteration,
        }
        if collapsed is not None:
            lane.run.set_tags({"collapsed": str(collapsed)})
        self.end_lane(lane, result, "COMPLETE")

    def end_diverged_lane(self, lane: SeedLane, err: NonFiniteLossError) -> None:
        """A seed whose loss went NaN or infinite: the worst value, so the race and the sampler count it."""
        worst = 0.0 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        reason = f"diverged: {err}"
        result = {"value": worst, "collapsed": reason, "iteration": lane.training.iteration}
        self.end_lane(lane, result, "FAIL", reason)

    def end_lane(self, lane: SeedLane, result: dict, state: str, error: str = "") -> None:
        """The lane's seed run is over: its result kept on the trial until the race grants it (a stop keeps it)."""
        lane.result = result | {"dir": self.seed_folder(lane.seed), "run_id": lane.run.run_id}
        self.close_lane(lane, state, error)
        set_seed_entry(self.trial, PENDING_SEEDS_ATTR, lane.seed, lane.result)
        set_seed_entry(self.trial, OPEN_SEED_RUN_ATTR, lane.seed, None)  # not in flight: a lost worker leaves it

    def close_lane(self, lane: SeedLane, state: str, error: str = "") -> None:
        if lane.training is not None:
            lane.training.close()
            lane.training = None  # its model and optimizers freed while the result waits
        close_trial_run(lane.run, self.trial, state, error)

    def keep_seed(self, seed: int, result: dict) -> None:
        """The granted seed on the trial (from a lane of this try, or kept pending by an earlier one)."""
        record_seed(self.trial, seed, result)
        set_seed_entry(self.trial, PENDING_SEEDS_ATTR, seed, None)
        self.run.log_metrics({"race/seed_value": result["value"]}, step=seed)
        for lane in [lane for lane in self.lanes if lane.seed == seed]:
            self.drop_lane(lane)

    def cancel_lane(self, lane: SeedLane) -> None:
        """A seed trained ahead that the race did not grant: its training stopped, its run deleted, its folder gone."""
        if lane.result is None:
            self.close_lane(lane, "FAIL", "cancelled: the race did not grant this seed")
        self.drop_lane(lane)

    def drop_lane(self, lane: SeedLane) -> None:
        self.lanes.remove(lane)
        if lane.borrowed and lane.stream is not None:
            self.population.give_stream(lane.stream)

    def cancel_ungranted(self) -> None:
        """Every seed run of this configuration the race did not grant, whichever try started it: deleted
        from MLflow (hidden from the UI and searches) and its folder removed."""
        for lane in list(self.lanes):
            self.cancel_lane(lane)
        granted = seed_runs(self.trial)
        started = {**open_seed_runs(self.trial), **{s: r["run_id"] for s, r in pending_results(self.trial).items()}}
        for seed, run_id in started.items():
            if seed in granted:
                continue
            Recorder.of_run(self.population.config.study.tracking_uri, run_id).delete()
            shutil.rmtree(self.seed_dir(seed), ignore_errors=True)
        self.trial.set_user_attr(OPEN_SEED_RUN_ATTR, None)
        self.trial.set_user_attr(PENDING_SEEDS_ATTR, None)

    def finish(self) -> Outcome:
        """The race of this configuration is over: seeds trained ahead and not granted cancelled, its mean told."""
        self.cancel_ungranted()
        result = finish_configuration(self.study, self.trial, self.population.config)
        seeds = len(seed_runs(self.trial))
        self.run.log_metrics({**result.figures, "race/seeds_run": float(seeds)}, step=0)
        self.run.set_tags({OUTCOME_ATTR: result.outcome, CROWNED_ATTR: str(result.crowned).lower()})
        close_trial_run(self.run, self.trial, "COMPLETE")
        self.tell(optuna.trial.TrialState.COMPLETE, result.value)
        return Outcome(self.trial, optuna.trial.TrialState.COMPLETE)

    def save(self) -> int:
        """Checkpoint every lane still training; the lowest iteration saved."""
        saved = []
        for lane in self.lanes:
            if lane.result is None:
                with lane.on_stream():
                    lane.training.save()
                saved.append(lane.training.iteration)
        return min(saved, default=0)

    def record_failure(self, error: str, err: BaseException | None = None) -> Outcome:
        for lane in list(self.lanes):  # the seed runs in flight: the retry reopens and resumes each
            if lane.result is None:
                self.close_lane(lane, "FAIL", error)
            self.drop_lane(lane)
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
        self.crown = crown_seeds(config)
        self.side_by_side = is_racing(config) and config.race.side_by_side
        if self.side_by_side and (self.size == 1 or not self._cuda):
            why = "a population of 1 has no free place" if self.size == 1 else "on CPU the lanes take turns"
            warnings.warn(
                f"[race] side_by_side gains nothing here ({why}); seeds it trains ahead and the race then "
                "does not grant are wasted work",
                stacklevel=2,
            )

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
        return sum(slot.width for slot in self.slots) >= self.size

    def lanes_for(self, slot: RacingSlot) -> int:
        """Seeds a raced configuration may train at once: one, or with side_by_side its own and every free place."""
        if not self.side_by_side:
            return 1
        return slot.width + self.size - sum(s.width for s in self.slots)

    def take_stream(self) -> torch.cuda.Stream | None:
        """A CUDA stream for one more lane (there is one per place of the population); None on CPU."""
        return self.free_streams.pop() if self._cuda else None

    def give_stream(self, stream: torch.cuda.Stream) -> None:
        self.free_streams.append(stream)

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
            outcome = slot.advance(slot.chunk(self._cuda), self.annotated, stop)
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
