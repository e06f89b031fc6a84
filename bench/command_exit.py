"""Wall time of one ``mbu`` process: the entry point (exit without teardown) against Python's own exit.

    python bench/command_exit.py [--rounds 5] [-- MBU ARGS...]

Both run the same command line in a fresh interpreter:

- ``python -m mbu ARGS`` (the ``mbu`` script runs the same :func:`mbu.__main__.run`), which ends the
  process once the exit hooks have run;
- the baseline ``python -c "import sys; from mbu.cli import main; sys.exit(main())" ARGS``, which lets
  Python tear the interpreter down as it normally does.

The default command, ``mbu search STUDY --summary`` on a one-trial study of the built-in synthetic
data, imports what a real launch imports (torch, MLflow, Optuna, matplotlib) and opens both stores.
Rounds alternate which runs first; printed are the median times and the median of the rounds' own
ratios (baseline over entry point) with their range.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """[study]
name = "bench-exit"
n_trials = 1
registered_model = ""

[data.synthetic]
size = 64
n_train = 8
n_test = 6

[train]
resize = 64
bs = 4
iters = 2
progress_iter = 1
device = "cpu"
"""
BASELINE = "import sys; from mbu.cli import main; sys.exit(main())"


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (each runs both once)")
    parser.add_argument("args", nargs="*", help="the mbu command line to time (default: search STUDY --summary)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbu-bench-exit-") as folder:
        cwd = Path(folder)
        args = options.args
        if not args:
            (cwd / "study.toml").write_text(STUDY)
            subprocess.run([sys.executable, "-m", "mbu", "search", "study.toml", "--no-progress"], cwd=cwd, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            args = ["search", "study.toml", "--summary"]
        entry, baseline = [sys.executable, "-m", "mbu", *args], [sys.executable, "-c", BASELINE, *args]
        times: dict[str, list[float]] = {"entry": [], "baseline": []}
        for round_ in range(options.rounds):
            order = [("entry", entry), ("baseline", baseline)]
            for name, command in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(timed(command, cwd))
    ratios = [b / e for b, e in zip(times["baseline"], times["entry"], strict=True)]
    print(f"command: mbu {' '.join(args)}  ({options.rounds} rounds)")
    print(f"  python's exit (baseline)  {statistics.median(times['baseline']):6.2f} s")
    print(f"  mbu entry point           {statistics.median(times['entry']):6.2f} s")
    spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}"
    print(f"  ratio baseline / entry    {statistics.median(ratios):6.2f}x  ({spread})")


if __name__ == "__main__":
    main()
