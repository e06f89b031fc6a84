"""The research code's command lines parse unchanged, and every flag is documented."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from helpers import mbu_command

from mbu.cli import build_parser
from mbu.train.cli import config_from_args

# The published hyperparameter lines of the seed README, verbatim.
PRESETS = {
    "smile": "--lr 0.0002 --disclr 0.0002 --alpha1 1.0 --alpha2 1.0 --beta1 0.0 --beta2 0.0001 --gama 7.0 "
    "--delta 5.0 --discweight 0.005",
    "blond": "--lr 0.0002 --disclr 0.0002 --alpha1 0.1 --alpha2 0.1 --beta1 0.0 --beta2 0.04 --gama 1.0 "
    "--delta 1.0 --discweight 1.0",
    "bald": "--lr 0.0002 --disclr 0.0002 --alpha1 0.5 --alpha2 0.5 --beta1 0.0 --beta2 0.5 --gama 5.0 "
    "--delta 5.0 --discweight 1.0",
}
REFERENCE_FLAGS = (
    "root out lr bs iters resize sep discweight disclr progress_iter display_iter save_iter load num_display "
    "alpha1 alpha2 beta1 beta2 gama delta gpu"
).split()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_published_presets_parse_verbatim(name: str) -> None:
    line = f"train --root ./data --out ./exp {PRESETS[name]}"
    cfg = config_from_args(build_parser().parse_args(shlex.split(line)))
    tokens = shlex.split(PRESETS[name])
    for flag, value in zip(tokens[::2], tokens[1::2], strict=True):
        key = flag.lstrip("-")
        actual = getattr(cfg, key) if hasattr(cfg, key) else getattr(cfg.weights, key)
        assert actual == float(value), key


def test_eyewear_defaults_and_reference_commands() -> None:
    cfg = config_from_args(
        build_parser().parse_args(shlex.split("train --root ./glasses_data --out ./glasses_experiment"))
    )
    assert (cfg.lr, cfg.disclr, cfg.bs, cfg.iters, cfg.resize, cfg.sep) == (2e-4, 2e-4, 32, 150_000, 128, 25)
    w = cfg.weights
    assert (w.alpha1, w.alpha2, w.beta1, w.beta2, w.gama, w.delta, w.discweight) == (0.7, 0.7, 0, 0.001, 7, 5, 0.005)
    resume = build_parser().parse_args(shlex.split("train --root d --out o --load ./glasses_experiment --gpu 3"))
    assert resume.load == "./glasses_experiment" and resume.gpu == 3


def test_every_reference_flag_is_accepted_and_documented(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in REFERENCE_FLAGS:
        assert f"--{flag} " in text, flag
    for term in ("L_Recon1", "L_Recon2", "L_Cycle", "L_DC"):
        assert term in text


def test_numeric_flags_are_typed() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--bs", "many"])


def test_the_process_entry_point_keeps_output_and_exit_status(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `python -m mbu` ends the process itself after the exit hooks: all output still arrives, and the
    # status is Python's (0 for --help, 1 for an exception that escapes, as MBU_DEBUG=1 lets one do).
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to it, here and in the process
    shown = subprocess.run(mbu_command("--help"), capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == build_parser().format_help()
    monkeypatch.setenv("MBU_DEBUG", "1")
    failed = subprocess.run(mbu_command("search", "missing.toml"), capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" in failed.stderr and "missing.toml" in failed.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "line",
    [
        "confirm sig.toml --seeds 6",
        "confirm sig.toml --top-k 2 --no-presets --tracking-uri sqlite:///other.db",
        "search sig.toml --n-trials 50 --workers 3 --population 2 --storage sqlite:///s.db",
        "search sig.toml",
    ],
)
def test_a_stopped_launch_names_the_command_that_goes_on_with_its_flags(line: str, capsys) -> None:
    from mbu.search.cli import relaunch_command
    from mbu.search.judging.study_report import StudySummary
    from mbu.search.launching.outcome import exit_code

    args = build_parser().parse_args(shlex.split(line))
    again = relaunch_command(args)
    assert build_parser().parse_args(shlex.split(again)[1:]) == args  # the same command, flags included
    prog = f"mbu {line.split()[0]}"
    stopped = StudySummary("sig", "sqlite:///optuna.db", "sqlite:///mlflow.db", {}, stopped_by="SIGTERM")
    assert exit_code(stopped, None, again=again, prog=prog) == 75
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: stopped by SIGTERM") and err.endswith(f": {again}")


def test_a_stopped_training_names_the_resume_command_with_log_model() -> None:
    from mbu.train.cli import resume_command

    args = build_parser().parse_args(shlex.split("train --root d --out r --iters 9 --log-model --experiment e"))
    again = shlex.split(resume_command(args, config_from_args(args)))
    resumed = build_parser().parse_args(again[1:])
    assert resumed.log_model and resumed.experiment == "e" and again[2:6] == ["--out", "r", "--load", "r"]
