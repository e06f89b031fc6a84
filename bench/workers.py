"""Wall time of one synthetic study run by 1 worker and by N workers on this machine.

    python bench/workers.py [--workers 4] [--trials 4] [--iters 100]

Both runs are ``mbu search --workers K`` on the same shortened copy of
``studies/synthetic_glasses.toml`` (fresh storage each), with the decode cache
warm for both. Prints each wall time and the speed-up. On a CPU machine the
workers share the cores (each gets cores / N threads), so the gain comes only
from overlapping evaluation, I/O and start-up; on several GPUs each worker gets
its own device (``--gpus``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def study_text(name: str, trials: int, iters: int) -> str:
    text = (REPO / "studies" / "synthetic_glasses.toml").read_text()
    for key, value in (("name", f'"{name}"'), ("n_trials", trials), ("iters", iters), ("eval_every", iters)):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    return text.replace("save_iter = 250", f"save_iter = {iters}")


def timed_search(folder: Path, workers: int, args: argparse.Namespace) -> float:
    folder.mkdir()
    (folder / "study.toml").write_text(study_text("bench-workers", args.trials, args.iters))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
    command = [sys.executable, "-m", "mbu", "search", "study.toml", "--workers", str(workers), "--no-progress"]
    start = time.monotonic()
    subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="workers of the second run (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4, help="trials of the study (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=100, help="iterations per trial (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MBU_CACHE_DIR", f"{tmp}/cache")
        os.environ["PYTHONPATH"] = str(REPO)
        one = timed_search(Path(tmp) / "one", 1, args)
        many = timed_search(Path(tmp) / "many", args.workers, args)
    print(f"{args.trials} trials x {args.iters} iterations, {os.cpu_count()} CPUs")
    print(f"1 worker : {one:7.1f} s")
    print(f"{args.workers} workers: {many:7.1f} s")
    print(f"speed-up : {one / many:7.2f}x")


if __name__ == "__main__":
    main()
