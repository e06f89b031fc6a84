"""Pruning's worth: the same synthetic study with and without the median pruner.

    python bench/pruning.py [--trials 6] [--iters 200] [--eval-every 50]

Both copies use the same seed, trial budget, data and search space (those of
``studies/synthetic_glasses.toml``, shortened); one prunes on the validation
IoU reported every ``--eval-every`` iterations. Prints, for each, the training
iterations spent (a pruned trial counts up to where it stopped), the trials
by state, the best validation IoU and the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbu.search.launching.launch import LaunchOptions, run_study  # noqa: E402
from mbu.search.studyfile.study_file import StudyConfig, load_study_file  # noqa: E402


def shortened(base: StudyConfig, name: str, pruner: str, args: argparse.Namespace) -> StudyConfig:
    study = replace(base.study, name=name, pruner=pruner, n_trials=args.trials, storage="sqlite:///optuna.db")
    train = {**base.train, "iters": args.iters, "eval_every": args.eval_every, "save_iter": args.iters}
    return replace(base, study=study, train=train)


def iterations_spent(study: optuna.Study, iters: int) -> int:
    total = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            total += iters
        elif trial.intermediate_values:
            total += max(trial.intermediate_values)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="finished trials per study (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=200, help="iterations of a full trial (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=50, help="report interval (default: %(default)s)")
    args = parser.parse_args()
    base = load_study_file(REPO / "studies" / "synthetic_glasses.toml")

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ.setdefault("MBU_CACHE_DIR", f"{tmp}/cache")
        rows = []
        for label, pruner in (("no pruning", "none"), ("median pruner", "median")):
            config = shortened(base, f"bench-{pruner}", pruner, args)
            start = time.monotonic()
            summary = run_study(config, LaunchOptions(progress=False))
            seconds = time.monotonic() - start
            study = optuna.load_study(study_name=config.study.name, storage=config.study.storage)
            best = study.best_value if summary.best_number is not None else float("nan")
            rows.append((label, iterations_spent(study, args.iters), summary.states, best, seconds))

    print(f"{args.trials} trials x {args.iters} iterations, reports every {args.eval_every}, same seed and space")
    for label, spent, states, best, seconds in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        print(f"{label:<14} iterations {spent:>6}  best val IoU {best:.4f}  ({counts}; {seconds:.0f} s)")
    print(f"iterations saved by pruning: {1 - rows[1][1] / rows[0][1]:.0%}")


if __name__ == "__main__":
    main()
