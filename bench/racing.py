"""Does the search pick right? Hundreds of simulated studies per policy, at equal budget in seed runs.

    python bench/racing.py --study studies/synthetic_glasses.toml --budget 30 --repeats 200 --json racing.json

Each repeated study runs the project's own search code against a simulated objective instead of training:
the study file's sampler (seeded per trial, as a launch does), its presets queued first, and for racing the
same decisions a study makes (``mbu.search.judging.race``: next seed, the crown, the incumbent). Repeat r is
the study file with ``[train].seed`` moved on by 1000 r, so that each repeat trains on seeds of its own: with
one set of seeds for all, every repeat would race the preset's same few values, one draw rather than a policy.
``--objective FILE.py`` defines ``value(params: dict[str, float], seed: int) -> float``, deterministic in
(params, seed); the default is ``bench/objectives/synthetic_glasses.py``, calibrated on the synthetic-glasses
study.

Policies, each given ``--budget`` seed runs (one training of one seed):

- ``single_seed``: one seed per configuration; the choice is the best value (the search without ``[race]``);
- ``single_seed_confirmed``: the same search on fewer runs, then its best trial and the first preset trained
  on ``--seeds`` fresh seeds each (as ``mbu confirm`` does); the choice is the higher fresh-seed mean;
- ``racing``: configurations raced over ``--seeds`` paired seeds, then ``--crown-seeds`` for the crown at
  ``--crown-confidence`` (defaults: the study's ``[race]``); the choice is the incumbent.

The true value of a configuration is its mean ``value`` over 256 seeds from 10**9 that no search uses.
Printed and written to ``--json``: per policy, the mean true value of the choice, the share of studies whose
choice is truly worse than the first preset, and the seed runs used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna

from mbu.search.judging.confirm import candidates, fresh_seeds
from mbu.search.judging.race import (
    CROWN_SEEDS_ATTR,
    RACE_SEEDS_ATTR,
    finish_configuration,
    incumbent,
    next_seed,
    race_seeds,
    record_seed,
)
from mbu.search.launching.sampler import make_sampler
from mbu.search.launching.study import queue_presets
from mbu.search.running.trial import suggest_params
from mbu.search.studyfile.confirm_settings import ConfirmSettings
from mbu.search.studyfile.race_settings import RaceSettings, race_problem
from mbu.search.studyfile.study_file import StudyConfig, load_study_file

Objective = Callable[[dict[str, float], int], float]
TRUE_SEEDS = range(10**9, 10**9 + 256)  # never used by any search
REPEAT_STRIDE = 1000  # repeat r trains from seed [train].seed + 1000 r
DEFAULT_OBJECTIVE = Path(__file__).with_name("objectives") / "synthetic_glasses.py"
POLICIES = ("single_seed", "single_seed_confirmed", "racing")


def load_objective(path: Path) -> Objective:
    spec = importlib.util.spec_from_file_location("simulated_objective", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "value", None)):
        raise SystemExit(f"{path}: defines no value(params, seed) function")
    return module.value


def new_study(config: StudyConfig, repeat: int, seeds: int) -> optuna.Study:
    """An in-memory study as a launch opens it: the file's sampler, seeded per repeat, its presets queued."""
    study = optuna.create_study(
        direction=config.study.direction, sampler=make_sampler(config.study.sampler, config.study.seed + repeat)
    )
    if seeds > 1:
        study.set_user_attr(RACE_SEEDS_ATTR, seeds)
    queue_presets(study, config.enqueue, max_retry=0, n_trials=config.study.n_trials)
    return study


def for_repeat(config: StudyConfig, repeat: int) -> StudyConfig:
    """The study file as repeat ``repeat`` runs it: its training seeds moved on, so that no two repeats share any."""
    base = int(config.train.get("seed", 0)) + REPEAT_STRIDE * repeat
    return replace(config, train={**config.train, "seed": base})


def single_seed(config: StudyConfig, objective: Objective, budget: int, repeat: int) -> tuple[dict, int]:
    """Today's search: each configuration trained on the one search seed; the best value wins."""
    seed = race_seeds(config)[0]  # [train].seed: the first of the race's seeds, and the only one here
    study = new_study(config, repeat, 1)
    for _ in range(budget):
        trial = study.ask()
        study.tell(trial, objective(suggest_params(trial, config), seed))
    return dict(incumbent(study).params), budget


def single_seed_confirmed(
    config: StudyConfig, objective: Objective, budget: int, repeat: int, seeds: int
) -> tuple[dict, int]:
    """Search on fewer runs, then confirm its best trial and the first preset on fresh seeds (``mbu confirm``)."""
    confirm = ConfirmSettings(top_k=1, seeds=seeds, presets=True)
    plain = replace(config, race=None, confirm=confirm, enqueue=config.enqueue[:1])
    search_budget = budget - 2 * seeds  # room for two candidates on every fresh seed
    seed = race_seeds(plain)[0]
    study = new_study(plain, repeat, 1)
    for _ in range(search_budget):
        trial = study.ask()
        study.tell(trial, objective(suggest_params(trial, plain), seed))
    chosen = candidates(study, plain)
    fresh = fresh_seeds(plain, seeds)
    means = {c.trial: statistics.fmean(objective(c.params, s) for s in fresh) for c in chosen}
    best = max(chosen, key=lambda c: (means[c.trial], -c.trial))  # the confirmed best: highest fresh-seed mean
    return dict(best.params), search_budget + len(chosen) * len(fresh)


def racing(config: StudyConfig, objective: Objective, budget: int, repeat: int) -> tuple[dict, int]:
    """Configurations raced over paired seeds with the study's own race decisions; the incumbent wins."""
    study = new_study(config, repeat, config.race.seeds)
    study.set_user_attr(CROWN_SEEDS_ATTR, config.race.crown_seeds)
    used = 0
    while used < budget:
        trial = study.ask()
        params = suggest_params(trial, config)
        while (seed := next_seed(study, config, trial)) is not None and used < budget:
            record_seed(trial, seed, {"value": objective(params, seed)})
            used += 1
        if seed is not None:  # out of budget mid-race: this configuration never finished
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        study.tell(trial, finish_configuration(study, trial, config).value)
    best = incumbent(study)
    if best is None:  # the budget ran out before any configuration ran all k seeds
        return dict(config.enqueue[0]), used
    return dict(best.params), used


def true_value(objective: Objective, params: dict[str, float], cache: dict) -> float:
    key = tuple(sorted(params.items()))
    if key not in cache:
        cache[key] = statistics.fmean(objective(params, seed) for seed in TRUE_SEEDS)
    return cache[key]


def simulate(config: StudyConfig, objective: Objective, budget: int, repeats: int, seeds: int) -> dict:
    """Each policy over ``repeats`` studies: mean true value of its choice, how often it is worse than the preset."""
    preset = dict(config.enqueue[0])
    cache: dict = {}
    preset_value = true_value(objective, preset, cache)
    runners = {
        "single_seed": lambda r: single_seed(for_repeat(config, r), objective, budget, r),
        "single_seed_confirmed": lambda r: single_seed_confirmed(for_repeat(config, r), objective, budget, r, seeds),
        "racing": lambda r: racing(for_repeat(config, r), objective, budget, r),
    }
    policies = {}
    for name in POLICIES:
        values, used, started = [], [], time.monotonic()
        for repeat in range(repeats):
            params, runs = runners[name](repeat)
            values.append(true_value(objective, params, cache))
            used.append(runs)
        policies[name] = {
            "mean_true_value": statistics.fmean(values),
            "worse_than_preset_rate": sum(v < preset_value - 1e-12 for v in values) / repeats,
            "mean_runs_used": statistics.fmean(used),
            "seconds": round(time.monotonic() - started, 1),
        }
    return {"preset_true_value": preset_value, "budget": budget, "repeats": repeats, "policies": policies}


def table(result: dict, race: RaceSettings) -> str:
    lines = [
        f"budget {result['budget']} seed runs, {result['repeats']} studies per policy, {race.seeds} seeds, "
        f"margin {race.margin}, {race.crown_seeds} crown seeds at confidence {race.crown_confidence}; "
        f"preset's true value {result['preset_true_value']:.4f}",
        f"{'policy':<24}{'mean true value':>16}{'worse than preset':>19}{'runs used':>11}",
    ]
    for name, row in result["policies"].items():
        lines.append(
            f"{name:<24}{row['mean_true_value']:>16.4f}{row['worse_than_preset_rate']:>19.1%}"
            f"{row['mean_runs_used']:>11.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--study",
        type=Path,
        default=Path("studies/synthetic_glasses.toml"),
        help="study file: its space, presets, sampler and seed, and [race] (default: %(default)s)",
    )
    parser.add_argument(
        "--objective",
        type=Path,
        default=DEFAULT_OBJECTIVE,
        help="Python file defining value(params, seed) -> float (default: the calibrated one)",
    )
    parser.add_argument("--budget", type=int, default=30, help="seed runs each study may spend (default: 30)")
    parser.add_argument("--repeats", type=int, default=200, help="studies per policy (default: 200)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="race and confirmation seeds (default: the study's [race].seeds, else 3)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="the race's forgiving margin (default: the study's [race].margin, else 0)",
    )
    parser.add_argument(
        "--crown-seeds",
        type=int,
        default=None,
        help="seeds after the race's that judge a challenger's crown (default: the study's [race].crown_seeds)",
    )
    parser.add_argument(
        "--crown-confidence",
        type=float,
        default=None,
        help="the crown's one-sided Welch t-test level, 0 for a better mean (default: the study's [race])",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_study_file(args.study)
    if not config.enqueue:
        raise SystemExit(f"{args.study}: needs an [[enqueue]] point: the preset every policy is compared with")
    race = config.race or RaceSettings()
    flags = {"seeds": args.seeds, "margin": args.margin}
    flags |= {"crown_seeds": args.crown_seeds, "crown_confidence": args.crown_confidence}
    race = replace(race, **{key: value for key, value in flags.items() if value is not None})
    problem = race_problem(race)
    if problem is not None:
        raise SystemExit(f"--{problem[0].replace('_', '-')} {problem[1]}")
    if race.seeds < 2 or args.budget < 2 * race.seeds + 1:
        raise SystemExit("--seeds must be at least 2 and --budget more than twice --seeds")
    config = replace(config, race=race)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    result = simulate(config, load_objective(args.objective), args.budget, args.repeats, race.seeds)
    result |= {key: getattr(race, key) for key in ("seeds", "margin", "crown_seeds", "crown_confidence")}
    result |= {"objective": str(args.objective), "study": str(args.study)}
    print(table(result, race))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
