"""The confirmation stage: candidates retrained on fresh seeds, paired intervals, exactly-once runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import DROP, TINY_ITERS, mbu_command, study_runs, tiny_study
from mlflow.tracking import MlflowClient
from scipy import stats

from mbu.cli import main
from mbu.search.judging.confirm import candidates
from mbu.search.judging.confirm_report import Interval, t_interval, verdict
from mbu.search.studyfile.study_file import load_study_file

CONFIRMED = {"top_k": 2, "seeds": 2}  # both search trials (trial 0 is the preset), seeds 1 and 2


def confirm_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=f"{name}/confirm", storage=storage).get_trials()


def pairs(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, int]]:
    """(candidate trial, seed) of each complete confirmation run."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return sorted((t.user_attrs["candidate_trial"], t.user_attrs["train_seed"]) for t in complete)


def test_the_t_interval_matches_scipy_and_a_hand_worked_case() -> None:
    # Hand-worked: mean 2, sd 1, t(0.975, 2) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138.
    hand = t_interval([1.0, 2.0, 3.0])
    assert (hand.n, hand.mean, hand.sd) == (3, 2.0, 1.0)
    assert hand.low == pytest.approx(2 - 2.484138, abs=1e-6) and hand.high == pytest.approx(2 + 2.484138, abs=1e-6)
    # Paired differences against scipy's paired t-test interval.
    a, b = [0.41, 0.38, 0.44, 0.40], [0.37, 0.36, 0.41, 0.40]
    ours = t_interval([x - y for x, y in zip(a, b, strict=True)])
    theirs = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=1e-12)
    assert t_interval([0.5]).low is None and t_interval([]).mean is None


def test_verdicts_say_beats_only_when_the_interval_excludes_zero() -> None:
    assert verdict("trial 1", "preset #1 (trial 0)", Interval(3, 0.031, 0.01, 0.008, 0.054), 3) == (
        "trial 1 beats preset #1 (trial 0) by 0.0310 test IoU, 95% interval [0.0080, 0.0540], 3 of 3 seeds"
    )
    assert "is worse than preset by 0.0200" in verdict("trial 1", "preset", Interval(3, -0.02, 0.01, -0.04, -0.01), 0)
    spans = verdict("trial 1", "preset", Interval(3, 0.01, 0.02, -0.03, 0.05), 2)
    assert "not distinguishable from preset" in spans and "spans 0" in spans
    assert "too few for an interval" in verdict("trial 1", "preset", Interval(1, 0.01), 1)


def test_candidates_are_the_top_k_then_the_presets_and_too_few_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(tiny_study("ranked", 4, confirm={"top_k": 2}, enqueue=[{"lr": 2e-4}]))
    config = load_study_file(tmp_path / "s.toml")
    study = optuna.create_study(direction="maximize")
    for value, lr in [(0.2, 2e-4), (0.5, 3e-4), (0.4, 5e-4), (0.1, 9e-4)]:  # trial 0 runs the preset
        study.enqueue_trial({"lr": lr})
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-3, log=True)
        study.tell(trial, value)
    chosen = candidates(study, config)
    assert [(c.trial, c.label) for c in chosen] == [(1, "trial 1"), (2, "trial 2"), (0, "preset #1 (trial 0)")]
    config.confirm.top_k = 5
    with pytest.raises(ValueError, match=r"\[confirm\].top_k = 5, but study ranked has 4 complete trial"):
        candidates(study, config)
    with pytest.raises(ValueError, match="no complete trial to confirm"):
        candidates(optuna.create_study(), config)


@pytest.mark.slow
def test_a_confirmed_run_equals_mbu_train_with_its_parameters_and_seed_and_seeds_top_up(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    study = tiny_study("confirmed", 2, study={"seed": 4}, confirm=CONFIRMED, enqueue=[{"lr": 2e-4}])
    (tmp_path / "study.toml").write_text(study)
    assert main(["search", "study.toml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "confirmation on 2 fresh seeds (4 of 4 runs finished):" in out and "confirmed best: " in out

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = confirm_trials(storage, "confirmed")
    assert pairs(trials) == [(0, 1), (0, 2), (1, 1), (1, 2)]  # the search trained with seed 0: never reused
    report = json.loads((tmp_path / "runs" / "confirmed" / "confirm_report.json").read_text())
    assert report["seeds"] == [1, 2] and report["runs_finished"] == report["runs_planned"] == 4
    assert sorted(c["trial"] for c in report["candidates"]) == [0, 1]
    assert [c["preset"] for c in report["candidates"]].count(0) == 1  # trial 0 ran the [[enqueue]] point
    assert len(report["comparisons"]) == 1 and report["comparisons"][0]["preset"] == 0

    # MLflow: each confirmation run nested under the study's parent, tagged with its candidate and seed.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = study_runs(client, "confirmed")
    confirm_runs = [r for r in runs.trials if r.data.tags.get("stage") == "confirm"]
    assert len(confirm_runs) == 4 and len(runs.parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in confirm_runs} == {runs.parents[0].info.run_id}
    assert sorted((int(r.data.tags["candidate_trial"]), int(r.data.tags["seed"])) for r in confirm_runs) == pairs(
        trials
    )
    parent = client.get_run(runs.parents[0].info.run_id)
    assert parent.data.tags["confirmed/state"] == "complete" and "confirmed/test_iou_mean" in parent.data.metrics

    # The run of (trial 1, seed 2) is an ordinary mbu train run with that trial's lr and seed 2.
    lr = optuna.load_study(study_name="confirmed", storage=storage).trials[1].params["lr"]
    run = next(t for t in trials if (t.user_attrs["candidate_trial"], t.user_attrs["train_seed"]) == (1, 2))
    root = tmp_path / "runs" / "confirmed" / "synthetic-64px-seed3"
    train = ["train", "--root", str(root), "--out", "alone", "--resize", "64", "--bs", "4", "--iters", str(TINY_ITERS)]
    train += ["--progress_iter", "2", "--lr", repr(lr), "--seed", "2", "--device", "cpu", "--no-progress"]
    assert main(train) == 0
    assert main(["eval", "--run", "alone", "--no-progress"]) == 0
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())["metrics"]
    assert alone["test/iou"] == pytest.approx(run.user_attrs["test/iou"], abs=1e-6)
    assert alone["val/iou_best"] == pytest.approx(run.value, abs=1e-6)
    alone_run = json.loads((tmp_path / "alone" / "mlflow_run.json").read_text())["run_id"]
    history = lambda run_id: [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss_total")]  # noqa: E731
    assert history(alone_run) == history(run.user_attrs["mlflow_run_id"]) != []

    # Raising seeds tops up: one new run per candidate, nothing trained twice; a finished one runs nothing.
    assert main(["confirm", "study.toml", "--seeds", "3", "--no-progress"]) == 0
    assert pairs(confirm_trials(storage, "confirmed")) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert main(["confirm", "study.toml", "--seeds", "3", "--no-progress"]) == 0
    assert len(confirm_trials(storage, "confirmed")) == 6
    markdown = (tmp_path / "runs" / "confirmed" / "study_report.md").read_text()
    assert "## Confirmation" in markdown and "confirm_report.md" in markdown


def test_a_study_without_confirm_is_not_confirmed_and_says_how(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("plain", 1, train={"iters": 2, "progress_iter": 1}))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    assert "not confirmed: mbu confirm study.toml" in capsys.readouterr().out
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")]
    assert names == ["plain"]
    assert not (tmp_path / "runs" / "plain" / "confirm").exists()


def test_confirm_refuses_a_study_short_of_its_target_and_changes_nothing(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("short", 2, confirm={"seeds": 2}))
    assert main(["confirm", "study.toml", "--no-progress"]) == 2
    assert "has 0 of 2 finished trials; run mbu search study.toml first" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_an_interrupted_confirmation_resumes_and_runs_every_pair_exactly_once(tmp_path: Path) -> None:
    # Runs of 12 iterations, a checkpoint every 3: SIGTERM lands mid-confirmation.
    train = {"iters": 12, "progress_iter": 3, "save_iter": 3}
    (tmp_path / "study.toml").write_text(tiny_study("resumed", 1, train=train, confirm={"seeds": 2}))
    launch = subprocess.Popen(mbu_command("search", "study.toml", "--no-progress"), cwd=tmp_path)
    confirm_dir = tmp_path / "runs" / "resumed" / "confirm"
    deadline = time.monotonic() + 300
    while not list(confirm_dir.glob("trial-*/checkpoint.pt")):
        assert launch.poll() is None and time.monotonic() < deadline, "no confirmation checkpoint appeared"
        time.sleep(0.2)
    launch.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=120) == 75

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stopped = [t for t in confirm_trials(storage, "resumed") if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 1 and "stopped: SIGTERM" in stopped[0].user_attrs["error"]
    assert main(["search", "study.toml", "--no-progress"]) == 0  # the relaunch, in this process

    trials = confirm_trials(storage, "resumed")
    assert pairs(trials) == [(0, 1), (0, 2)]  # each pair once, the stopped one resumed
    retry = next(t for t in trials if t.user_attrs.get("resumed_from_iteration"))
    assert retry.user_attrs["train_seed"] == stopped[0].user_attrs["train_seed"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    confirm_runs = [r for r in study_runs(client, "resumed").trials if r.data.tags.get("stage") == "confirm"]
    finished = sorted(int(r.data.tags["seed"]) for r in confirm_runs if r.info.status == "FINISHED")
    assert finished == [1, 2] and sum(r.info.status == "FAILED" for r in confirm_runs) == 1
    report = json.loads((tmp_path / "runs" / "resumed" / "confirm_report.json").read_text())
    assert report["runs_finished"] == 2 and math.isfinite(report["candidates"][0]["test_iou"]["mean"])


@pytest.mark.slow
def test_two_workers_share_the_confirmation_and_run_each_pair_once(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    study = tiny_study("shared", 2, study={"seed": 5}, confirm={"top_k": 2, "seeds": 2, "presets": False})
    (tmp_path / "study.toml").write_text(study)
    assert main(["search", "study.toml", "--workers", "2", "--no-progress"]) == 0
    assert "confirmation on 2 fresh seeds (4 of 4 runs finished):" in capsys.readouterr().out
    trials = confirm_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "shared")
    assert pairs(trials) == [(0, 1), (0, 2), (1, 1), (1, 2)] and len(trials) == 4
    workers = {int(t.user_attrs["worker"].split(":")[1]) for t in trials}
    assert os.getpid() not in workers  # run by the worker processes, not the launcher
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = study_runs(client, "shared")
    assert len(runs.parents) == 1 and sum(r.data.tags.get("stage") == "confirm" for r in runs.trials) == 4


def test_a_preset_that_failed_in_the_search_is_named_in_the_verdict(tmp_path: Path, capsys) -> None:
    tables = {
        "study": {"max_retry": 0, "max_failures": 5},
        "space": {"lr": {"low": 1e-4, "high": 1e12, "log": True}},
        "enqueue": [{"lr": 1e12}, {"lr": 3e-4}],  # the first diverges: its loss is non-finite at once
        "confirm": {"top_k": 1, "seeds": 1},
    }
    (tmp_path / "s.toml").write_text(tiny_study("lost", 1, **tables))

    assert main(["search", "s.toml", "--no-progress"]) == 0

    out = capsys.readouterr().out
    assert "confirm run 1 of 1: trial 1, preset #2, seed 1" in out.splitlines()  # which run of how many
    line = next(line for line in out.splitlines() if "not compared" in line)
    assert "preset #1 has no complete trial in the search (its 1 trial(s) ended FAIL: NonFiniteLossError" in line
    report = json.loads((tmp_path / "runs/lost/confirm_report.json").read_text())
    assert len(report["missing_presets"]) == 1 and [c["trial"] for c in report["candidates"]] == [1]
    assert "- Not compared: preset #1" in (tmp_path / "runs/lost/confirm_report.md").read_text()


def test_missing_run_folders_or_store_are_refused_before_anything_trains(tmp_path: Path, capsys) -> None:
    """With runs/ deleted, mbu confirm names the candidate's missing checkpoint before training (the champion
    is registered from it); with the MLflow store deleted, a relaunch says so instead of starting an empty one."""
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("gone", 1, study={"registered_model": DROP}))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()

    assert main(["confirm", "study.toml", "--no-progress", "--top-k", "1", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "trial 0's run folder" in err and "has no checkpoint.pt" in err, err
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["gone"]  # no confirmation study
    assert not (tmp_path / "runs" / "gone" / "confirm").exists()

    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    store.unlink()
    assert main(["search", "study.toml", "--no-progress", "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "no longer exists: restore it" in err, err
    assert not store.exists() and len(optuna.load_study(study_name="gone", storage=storage).trials) == 1


def test_a_collapsed_confirmation_run_is_flagged_in_the_verdict(tmp_path: Path) -> None:
    """A fresh-seed run whose masks do not beat the all-ones mask, or that the collapse guard ended, is named
    under the verdict as the search's summary names such a trial."""
    from mbu.search.judging.confirm import Candidate, Stage
    from mbu.search.judging.confirm_report import confirm_markdown, confirm_report, summary_lines

    (tmp_path / "s.toml").write_text(tiny_study("flags", 1))
    config = load_study_file(tmp_path / "s.toml")
    study = optuna.create_study(direction="maximize")
    figures = {  # seed -> the run's figures, as a confirmation run records them
        1: {"test/iou": 0.35, "baseline/iou_all_ones": 0.07, "test/marked_fraction": 0.2},
        2: {"test/iou": 0.06, "baseline/iou_all_ones": 0.07, "test/marked_fraction": 1.0},
        3: {"test/iou": 0.07, "baseline/iou_all_ones": 0.07, "collapsed": "marks 99.8% of pixels at iteration 50"},
    }
    for seed, attrs in figures.items():
        attrs = {**attrs, "candidate_trial": 4, "train_seed": seed}
        study.add_trial(optuna.trial.create_trial(value=attrs["test/iou"], user_attrs=attrs))
    stage = Stage(study, config, [Candidate(4, {"lr": 3e-4}, "trial 4", None, 0.4, 0.4)], [1, 2, 3], [])
    report = confirm_report(stage)

    lines = summary_lines(report)
    assert "  warning: trial 4, seed 2: the mask does not beat marking every pixel: test IoU 0.0600" in "\n".join(lines)
    assert "  warning: trial 4, seed 3: collapsed (marks 99.8% of pixels at iteration 50)" in lines
    assert not any("seed 1:" in line for line in lines)
    assert "- Degenerate masks: trial 4, seed 3: collapsed" in confirm_markdown(report)


@pytest.mark.slow
def test_an_oversized_confirmation_is_refused_and_a_launch_says_what_it_will_cost(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("cost", 1))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["confirm", "study.toml", "--no-progress", "--seeds", "100000"]) == 2
    assert "--seeds is 100000, more than 100" in capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["cost"]  # nothing queued

    assert main(["confirm", "study.toml", "--no-progress", "--top-k", "1", "--seeds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.startswith("confirmation: queuing"))
    assert line.startswith("confirmation: queuing 2 run(s) (1 candidate(s) x 2 seed(s)); one run took about ")
    assert line.endswith(" on one worker") and lines.index(line) < lines.index("confirm run 1 of 2: trial 0, seed 1")
    assert main(["confirm", "study.toml", "--no-progress", "--top-k", "1", "--seeds", "2"]) == 0
    assert not any(line.startswith("confirmation: queuing") for line in capsys.readouterr().out.splitlines())


@pytest.mark.slow
def test_a_narrower_relaunch_keeps_every_seed_and_candidate_already_confirmed(tmp_path: Path, capsys) -> None:
    """--top-k 1 --seeds 1 after a confirmation of 2 candidates on 2 seeds: the report (and with it the parent
    run and the registry) keeps both seeds and both candidates, and nothing new trains."""
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("keep", 2))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    assert main(["confirm", "study.toml", "--no-progress", "--top-k", "2", "--seeds", "2"]) == 0
    report_file = tmp_path / "runs/keep/confirm_report.json"
    before = json.loads(report_file.read_text())
    assert len(before["candidates"]) == 2 and before["runs_finished"] == 4
    capsys.readouterr()

    assert main(["confirm", "study.toml", "--no-progress", "--top-k", "1", "--seeds", "1", "--no-presets"]) == 0
    out = capsys.readouterr().out
    after = json.loads(report_file.read_text())
    assert after["seeds"] == [1, 2] and after["runs_finished"] == 4
    assert [c["trial"] for c in after["candidates"]] == [c["trial"] for c in before["candidates"]]
    assert after["confirmed_best"] == before["confirmed_best"]
    assert "confirmation: keeps all 2 seeds and candidate(s) trial " in out and "confirm run" not in out
