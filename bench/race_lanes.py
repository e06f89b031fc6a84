"""Wall time of one configuration raced over k seeds: its seeds one after another, and side by side.

    python bench/race_lanes.py [--device cuda] [--seeds 3] [--iters 200] [--rounds 2]

Both runs are ``mbu search`` on the same shortened copy of ``studies/synthetic_glasses.toml``
(one configuration: the preset, the first incumbent, which trains all ``--seeds`` race seeds;
no crown seeds, no collapse guard; fresh storage and synthetic data each run, the same for both), with
``[study] population = --seeds``; the only difference is ``[race] side_by_side``. The two modes
alternate for ``--rounds`` rounds so that a busy machine slows both alike; prints each run's wall
time, the median per mode and the ratio (one after another / side by side). Every seed is granted
here, so the figure is the overlap alone, with nothing trained ahead and cancelled.

On a CPU the slots take turns, so expect about 1x; the side-by-side lanes pay off where K steps
overlap, on a GPU's CUDA streams.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def study_text(name: str, args: argparse.Namespace, side_by_side: bool) -> str:
    """The quick start's study, shortened to one configuration raced on ``--seeds`` seeds in one population."""
    text = (REPO / "studies" / "synthetic_glasses.toml").read_text()
    replacements = {
        "name": f'"{name}"',
        "n_trials": 1,
        "iters": args.iters,
        "eval_every": args.iters,
        "save_iter": args.iters,
        "seeds": args.seeds,
    }
    for key, value in replacements.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        if not found:
            raise SystemExit(f"studies/synthetic_glasses.toml: no `{key} = ` line to shorten")
    text = text.replace("[study]\n", f"[study]\npopulation = {args.seeds}\n", 1)
    text = text.replace("[train]", f'[train]\ndevice = "{args.device}"\n#', 1)
    race = f"[race]\ncrown_seeds = 0\ncollapse_guard = false\nside_by_side = {'true' if side_by_side else 'false'}\n"
    return text.replace("[race]\n", race, 1)


def timed_search(folder: Path, args: argparse.Namespace, side_by_side: bool) -> float:
    folder.mkdir()
    (folder / "study.toml").write_text(study_text("bench-lanes", args, side_by_side))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
    command = [sys.executable, "-m", "mbu", "search", "study.toml", "--no-progress"]
    start = time.monotonic()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mbu search failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of the trainings: cpu or cuda (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="race seeds, and the population (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=200, help="iterations per seed run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating (default: %(default)s)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"one after another": [], "side by side": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MBU_CACHE_DIR", f"{tmp}/cache")
        for round_ in range(args.rounds):
            for mode, side_by_side in (("one after another", False), ("side by side", True)):
                seconds = timed_search(Path(tmp) / f"{round_}-{side_by_side}", args, side_by_side)
                times[mode].append(seconds)
                print(f"round {round_ + 1}, {mode}: {seconds:.1f} s", flush=True)
    print(f"{args.seeds} seeds x {args.iters} iterations on {args.device}, population {args.seeds}")
    median = {mode: statistics.median(values) for mode, values in times.items()}
    for mode, value in median.items():
        print(f"{mode:<18}: {value:7.1f} s (median of {args.rounds})")
    print(f"one after another / side by side: {median['one after another'] / median['side by side']:.2f}x")


if __name__ == "__main__":
    main()
