"""Samplers and pruners of a study, seeded per trial so that no two workers draw the same points.

A sampler seeded once per process replays its random stream in every
process: two workers, or a launch that tops a study up, would propose
trial 0's point again for trial 2. Here trial *n* draws from its own stream,
seeded from (study seed, *n*). Optuna hands out trial numbers once each, so
every trial of a study has a stream of its own, and the same study file
launched the same way proposes the same points (the sampler also sees the
trials already told, which concurrent workers may see in another order).

Enqueued presets and retries of failed trials take fixed parameters and draw
nothing: a retry keeps its trial's parameters on purpose, so it can resume
that trial's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mbu.search.studyfile.study_file import PRUNERS, SAMPLERS

SEED_ATTR = "sampler_seed"  # Optuna trial attribute: the seed its parameters were drawn with

PRUNER_OPTIONS = {"median": {"n_startup_trials": 2}}  # a pruner's options other than Optuna's defaults


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler that a study file's ``sampler`` names (``study_file.SAMPLERS``), seeded."""
    return getattr(optuna.samplers, SAMPLERS[name])(seed=seed)


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial ``number``'s random stream: distinct per trial, the same on every machine."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A study file's sampler, built afresh for each trial with :func:`trial_seed`.

    The samplers offered keep their state in the storage (TPE, random and GP
    rebuild from the finished trials; CMA-ES restores its optimizer from them),
    so a fresh one per trial proposes what a long-lived one would, minus the
    shared random stream.
    """

    def __init__(self, name: str, study_seed: int) -> None:
        self.name = name
        self.study_seed = study_seed
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}  # trials of this process not yet told

    def sampler_for(self, number: int) -> optuna.samplers.BaseSampler:
        """The sampler that draws trial ``number``'s parameters."""
        if number not in self._by_trial:
            self._by_trial[number] = build_sampler(self.name, trial_seed(self.study_seed, number))
        return self._by_trial[number]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler_for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler_for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.sampler_for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler_for(trial.number).before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.sampler_for(trial.number).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        for sampler in self._by_trial.values():
            sampler.reseed_rng()


def make_sampler(name: str, seed: int) -> TrialSeededSampler:
    """The study file's sampler (tpe, cmaes, gp or random), each trial seeded from ``seed`` and its number."""
    return TrialSeededSampler(name, seed)


def record_draw(trial: optuna.Trial) -> None:
    """Say on the trial where its parameters came from: its seed, or the preset or trial it repeats."""
    frozen = running_trial(trial)
    history = frozen.system_attrs.get("retry_history")
    if history:
        trial.set_user_attr("params_from", f"retry of trial {history[-1]}: same parameters, resumes its checkpoint")
    elif frozen.system_attrs.get("fixed_params"):
        trial.set_user_attr("params_from", "enqueued point ([[enqueue]] of the study file)")
    else:
        sampler = trial.study.sampler
        if isinstance(sampler, TrialSeededSampler):
            trial.set_user_attr(SEED_ATTR, trial_seed(sampler.study_seed, trial.number))


def running_trial(trial: optuna.Trial) -> FrozenTrial:
    """The frozen record of a running trial, system attributes included, through Optuna's public API."""
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next(frozen for frozen in running if frozen.number == trial.number)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The study file's pruner; it judges the validation IoU reported every ``eval_every`` iterations."""
    return getattr(optuna.pruners, PRUNERS[name])(**PRUNER_OPTIONS.get(name, {}))
