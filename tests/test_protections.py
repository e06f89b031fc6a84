"""What a user already has is never lost: run folders, inputs, reports, other studies' trials, presets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import mbu_command_with_ctrl_c, tiny_study
from mlflow.tracking import MlflowClient
from test_user_errors import fingerprint

from mbu.base.run_files import RUN_FILE
from mbu.cli import main
from mbu.search.launching.launch import LaunchOptions, run_study
from mbu.search.launching.study import STUDY_RECORD
from mbu.search.studyfile.study_file import StudyFileError, load_study_file
from mbu.train.checkpoint import load_checkpoint

TRAIN = ["train", "--resize", "64", "--bs", "4", "--progress_iter", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained by `mbu train` (so it has its MLflow run file), scored once by `mbu eval`."""
    folder = tmp_path_factory.mktemp("protected")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", tracking_uri(folder / "run"))
        assert main([*TRAIN, "--root", str(tiny_root), "--out", str(folder / "run"), "--iters", "2"]) == 0
        assert main(["eval", "--run", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


def tracking_uri(run: Path) -> str:
    return f"sqlite:///{run.parent / 'mlflow.db'}"


def test_train_paths_are_absolute_and_eval_works_from_anywhere(run: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((run / "config.json").read_text())
    assert Path(config["root"]).is_absolute() and Path(config["out"]).is_absolute()
    assert Path(load_checkpoint(run)["config"]["root"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    assert main(["eval", "--run", os.path.relpath(run, elsewhere), "--no-progress"]) == 0
    assert "test IoU" in capsys.readouterr().out


def test_train_records_its_mlflow_run_and_report_logs_to_it(run: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = json.loads((run / RUN_FILE).read_text())["run_id"]
    client = MlflowClient(tracking_uri(run))
    assert client.get_run(run_id).data.params["bs"] == "4"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(run))  # report logs to the same store
    assert main(["report", str(run), "--no-progress"]) == 0
    assert f"logged to MLflow run {run_id}" in capsys.readouterr().out
    assert "report.md" in {a.path for a in client.list_artifacts(run_id)}


def test_report_from_another_folder_logs_to_the_store_the_run_recorded_and_creates_none(
    run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = json.loads((run / RUN_FILE).read_text())
    assert record["tracking_uri"] == tracking_uri(run)  # absolute: the same store from any folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["report", str(copy), "--no-progress"]) == 0
    assert f"logged to MLflow run {record['run_id']}" in capsys.readouterr().out
    assert not (elsewhere / "mlflow.db").exists()

    # The store it recorded is gone: one line before any scoring, and no empty store made in its place.
    (copy / RUN_FILE).write_text(json.dumps({**record, "tracking_uri": f"sqlite:///{tmp_path / 'gone.db'}"}))
    (copy / "report.json").unlink()
    assert main(["report", str(copy), "--no-progress"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "gone.db").exists() and not (copy / "report.json").exists()


def test_resume_continues_with_the_checkpoints_settings(run: Path, tmp_path: Path, capsys) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    # Only --load, --out and --iters: root, batch size, resize and weights come from the checkpoint.
    assert main(["train", "--load", str(resumed), "--out", str(resumed), "--iters", "3", "--no-progress"]) == 0
    assert "resumed at 2, trained to 3" in capsys.readouterr().out
    state = load_checkpoint(resumed)
    assert state["iteration"] == 3 and state["config"]["bs"] == 4 and state["config"]["resize"] == 64


def test_eval_with_other_masks_keeps_the_runs_own_report(run: Path, tiny_root: Path, tmp_path: Path) -> None:
    masks = tmp_path / "my_masks"
    shutil.copytree(tiny_root / "testA_masks", masks)
    own = fingerprint(run)
    own = {path: entry for path, entry in own.items() if Path(path).parent == run}
    assert main(["eval", "--run", str(run), "--masks", str(masks), "--no-progress"]) == 0
    after = {path: entry for path, entry in fingerprint(run).items() if Path(path).parent == run}
    assert {p: e for p, e in after.items() if p in own} == own  # the run's own files untouched
    (report,) = run.glob("eval-my_masks-*/report.json")
    assert json.loads(report.read_text())["scored_on"]["masks"] == str(masks.resolve())


def test_eval_of_two_masks_folders_of_one_name_keeps_both_reports(run: Path, tiny_root: Path, tmp_path: Path) -> None:
    masks = sorted((tiny_root / "testA_masks").iterdir())
    for folder, kept in (("first", masks), ("second", masks[:4])):  # the second scores 4 of the 6 images
        (tmp_path / folder / "masks").mkdir(parents=True)
        for mask in kept:
            shutil.copy(mask, tmp_path / folder / "masks" / mask.name)
    for folder in ("first", "second"):
        assert main(["eval", "--run", str(run), "--masks", str(tmp_path / folder / "masks"), "--no-progress"]) == 0
    reports = {}
    for path in run.glob("eval-masks-*/report.json"):
        report = json.loads(path.read_text())
        reports[report["scored_on"]["masks"]] = (path.parent, report)
    assert set(reports) == {str(tmp_path / "first" / "masks"), str(tmp_path / "second" / "masks")}
    (first_dir, first), (second_dir, second) = (
        reports[str(tmp_path / "first" / "masks")],
        reports[str(tmp_path / "second" / "masks")],
    )
    assert first_dir != second_dir
    assert first["metrics"]["val/images"] + first["metrics"]["test/images"] == 6
    assert second["metrics"]["val/images"] + second["metrics"]["test/images"] == 4
    assert f"against the masks in `{tmp_path / 'second' / 'masks'}`" in (second_dir / "report.md").read_text()
    # The same folder scored again replaces its own report, and only that one.
    before = first_dir.joinpath("report.json").stat().st_mtime_ns
    assert main(["eval", "--run", str(run), "--masks", str(tmp_path / "first" / "masks"), "--no-progress"]) == 0
    assert len(list(run.glob("eval-masks-*/report.json"))) == 2
    assert first_dir.joinpath("report.json").stat().st_mtime_ns != before


def test_overwrite_replaces_the_run_and_its_stale_reports(run: Path, tiny_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "again"
    shutil.copytree(run, target)
    masks = tmp_path / "other_masks"
    shutil.copytree(tiny_root / "testA_masks", masks)
    assert main(["eval", "--run", str(target), "--masks", str(masks), "--no-progress"]) == 0
    (scored,) = target.glob("eval-other_masks-*")
    (target / "eval-notes").mkdir()  # a folder of the user's that only looks like a report folder
    (target / "eval-notes" / "todo.txt").write_text("the user's own file\n")
    assert (target / "report.md").is_file() and (scored / "report.json").is_file()
    assert main([*TRAIN, "--root", str(tiny_root), "--out", str(target), "--iters", "1", "--overwrite"]) == 0
    assert load_checkpoint(target)["iteration"] == 1
    assert not (target / "report.md").exists() and not (target / "masks.npz").exists()
    assert not scored.exists()  # the old model's report on other masks is gone too
    assert (target / "eval-notes" / "todo.txt").read_text() == "the user's own file\n"


def test_transfer_overwrite_leaves_no_earlier_pair_images(run: Path, tiny_root: Path, tmp_path: Path) -> None:
    guides = sorted((tiny_root / "testA").iterdir())[:2]
    target = str(sorted((tiny_root / "testB").iterdir())[0])
    out = tmp_path / "t"
    assert main(["transfer", "--run", str(run), "--guide", *map(str, guides), "--target", target, "--out", "t"]) == 0
    assert len(list(out.glob("*__on__*.png"))) == 2
    (out / "notes.txt").write_text("the user's own file\n")
    argv = ["transfer", "--run", str(run), "--guide", str(guides[1]), "--target", target, "--out", "t", "--overwrite"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{guides[1].stem}__on__{Path(target).stem}.png", "transfer_grid.png", "notes.txt"]
    )


def test_a_retry_that_completes_keeps_no_error_of_the_try_before(tmp_path: Path) -> None:
    """A trial stopped by SIGTERM is FAIL with its error; the retry queued for it completes without that error."""
    from mbu.search.launching.launch import LaunchOptions, prepare_study, resolve_settings
    from mbu.search.running.tracking import STOPS_ATTR, queue_retry

    (tmp_path / "study.toml").write_text(tiny_study("retried", train={"iters": 2, "progress_iter": 1}))
    config = resolve_settings(load_study_file(tmp_path / "study.toml"), LaunchOptions())
    study, _, parent = prepare_study(config, progress=False)
    parent.end("FINISHED")
    stopped = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL,
        params={"lr": 3e-4},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)},
        user_attrs={"error": "stopped: SIGTERM; checkpoint at iteration 0, queued to resume", STOPS_ATTR: 1},
    )
    study.add_trial(stopped)
    queue_retry(study, study.get_trials()[-1])

    assert run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(progress=False)).states == {
        "COMPLETE": 1,
        "FAIL": 1,
    }
    failed, retry = optuna.load_study(study_name="retried", storage="sqlite:///optuna.db").get_trials()
    assert failed.user_attrs["error"].startswith("stopped: SIGTERM")  # the stopped try keeps its own record
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == {"lr": 3e-4}
    assert "error" not in retry.user_attrs and retry.user_attrs[STOPS_ATTR] == 1


def test_same_stems_keep_every_output(run: Path, tiny_root: Path, tmp_path: Path, capsys) -> None:
    image = sorted((tiny_root / "testA").iterdir())[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / image.name)
    inputs = [str(tmp_path / "a" / image.name), str(tmp_path / "b" / image.name)]
    assert main(["remove", "--run", str(run), "--input", *inputs, "--out", "removed", "--device", "cpu"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "removed").iterdir()) == [f"{image.stem}-2.png", f"{image.stem}.png"]
    target = str(sorted((tiny_root / "testB").iterdir())[0])
    assert main(["transfer", "--run", str(run), "--guide", *inputs, "--target", target, "--out", "t"]) == 0
    assert len(list((tmp_path / "t").iterdir())) == 3  # two transfers and the grid


def test_a_study_of_the_same_name_in_another_storage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("twin", train={"iters": 2, "progress_iter": 1}))
    run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(progress=False))
    record = json.loads((tmp_path / "runs" / "twin" / STUDY_RECORD).read_text())
    assert record["storage"] == f"sqlite:///{tmp_path / 'optuna.db'}" and record["study"] == "twin"
    kept = fingerprint(tmp_path / "runs")

    with pytest.raises(StudyFileError, match=r"holds the trials of study 'twin' in sqlite:///.*optuna.db"):
        run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(storage="sqlite:///other.db", progress=False))
    optuna.delete_study(study_name="twin", storage="sqlite:///optuna.db")
    with pytest.raises(StudyFileError, match="earlier study 'twin' .* no longer exists"):
        run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(progress=False))
    assert fingerprint(tmp_path / "runs") == kept


def test_ctrl_c_in_train_is_one_line_and_resumable(tiny_root: Path, tmp_path: Path) -> None:
    argv = [*TRAIN, "--root", str(tiny_root), "--out", "run", "--iters", "400", "--save_iter", "2"]
    proc = subprocess.Popen(mbu_command_with_ctrl_c(*argv), cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len([line for line in lines if line.startswith("mbu train:")]) == 1 and "Traceback" not in err, err
    last = lines[-1]
    saved = load_checkpoint(tmp_path / "run")["iteration"]
    assert last.startswith("mbu train: interrupted at iteration ") and f"iteration {saved} in" in last, last
    assert f"mbu train --out {tmp_path / 'run'} --load {tmp_path / 'run'}" in last


@pytest.mark.slow
def test_a_preset_interrupted_by_ctrl_c_runs_on_the_next_launch(tmp_path: Path) -> None:
    study = tiny_study("preset", 2, train={"iters": 6, "progress_iter": 2}, enqueue=[{"lr": 2e-4}])
    (tmp_path / "study.toml").write_text(study)
    launch = mbu_command_with_ctrl_c("search", "study.toml", "--no-progress")
    proc = subprocess.Popen(launch, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_file = tmp_path / "runs" / "preset" / "trial-0" / "mlflow_run.json"
    deadline = time.monotonic() + 120
    while not run_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # the preset's trial has started: it fails
    proc.wait(timeout=60)

    assert main(["search", "study.toml", "--no-progress"]) == 0
    trials = optuna.load_study(study_name="preset", storage="sqlite:///optuna.db").get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].params == {"lr": 2e-4}
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2 and {"lr": 2e-4} in [t.params for t in finished]


@pytest.mark.slow
def test_a_point_added_to_a_finished_study_is_named_not_left_waiting(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("grown", 1))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    (tmp_path / "study.toml").write_text(tiny_study("grown", 1, enqueue=[{"lr": 3e-4}]))
    capsys.readouterr()

    assert main(["search", "study.toml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[[enqueue]] point #1 ({\"lr\": 0.0003}) is new to study 'grown', which has its 1 trials already" in out
    assert "launch it with --n-trials 2 to run it" in out
    study = optuna.load_study(study_name="grown", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # nothing left WAITING

    assert main(["search", "study.toml", "--no-progress", "--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="grown", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"] and study.trials[1].params["lr"] == 3e-4


def test_files_written_atomically_are_readable_as_any_other_tools_files(run: Path) -> None:
    """Checkpoints, configs and reports go through a private temporary file; the result takes the umask's mode."""
    from mbu.base.files import UMASK

    expected = 0o666 & ~UMASK
    for name in ("checkpoint.pt", "config.json", "mlflow_run.json"):
        assert (run / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.slow
def test_a_study_whose_stored_fingerprint_holds_a_key_made_free_relaunches(tmp_path: Path) -> None:
    """Studies created when skip_bad was fingerprinted still relaunch unchanged: it is free between launches now."""
    from mbu.search.launching.study import FINGERPRINT_ATTR

    os.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(tiny_study("older", 1, train={"skip_bad": True}))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    study = optuna.load_study(study_name="older", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    stored = study.user_attrs[FINGERPRINT_ATTR]
    study.set_user_attr(FINGERPRINT_ATTR, {**stored, "train": {**stored["train"], "skip_bad": True}})  # as it was
    assert main(["search", "study.toml", "--no-progress", "--n-trials", "2"]) == 0
    assert len(optuna.load_study(study_name="older", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 2
