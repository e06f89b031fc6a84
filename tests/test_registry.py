"""The study's champion as an MLflow model: registered, aliased, loaded by URI and served over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from helpers import DROP, free_port, study_runs, tiny_study
from mlflow.tracking import MlflowClient
from PIL import Image

from mbu.cli import main
from mbu.data.images import decode_images, to_model_range
from mbu.evaluate.report import load_model

NAME = "champ"


def pixels(path_or_bytes: Path | bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def run_folder_outputs(folder: Path, image: Path, threshold: float) -> tuple[np.ndarray, Path]:
    """The soft mask the run folder's weights give ``image``, and ``mbu remove --run``'s output for it."""
    model, cfg, _ = load_model(folder, "cpu")
    x = to_model_range(decode_images([image], cfg.resize)[0])
    mask = model.segment(x)[0, 0].double().numpy()
    out = folder.parent / "removed-by-run"
    removal = ["remove", "--run", str(folder), "--input", str(image), "--out", str(out), "--threshold", str(threshold)]
    assert main([*removal, "--device", "cpu"]) == 0
    return mask, out / f"{image.stem}.png"


@pytest.mark.slow
def test_the_champion_is_registered_aliased_moved_by_a_new_best_and_a_confirmation_and_used_by_uri(
    tmp_path: Path, capsys
) -> None:
    os.chdir(tmp_path)
    study_file = tmp_path / "study.toml"
    # 20 iterations: enough for lr 1e-3 to beat lr 1e-4 (the all-ones level) on validation IoU
    enqueue = [{"lr": 1e-4}, {"lr": 1e-3}]
    tables = {"study": {"registered_model": DROP}, "train": {"iters": 20}, "enqueue": enqueue}
    study_file.write_text(tiny_study(NAME, 1, **tables))
    assert main(["search", str(study_file), "--no-progress"]) == 0
    assert f"champion: models:/{NAME}@champion (version 1, trial 0, unconfirmed)" in capsys.readouterr().out
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = client.get_model_version_by_alias(NAME, "champion")
    trial_0 = optuna.load_study(study_name=NAME, storage=storage).trials[0]
    assert first.run_id == trial_0.user_attrs["mlflow_run_id"] and first.tags["unconfirmed"] == "true"
    assert first.tags["trial"] == "0" and "trial 0" in first.description

    # A relaunch with the same champion changes nothing.
    assert main(["search", str(study_file), "--no-progress"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1

    # A relaunch whose new trial is the new best: a new version, and the alias moves to it.
    assert main(["search", str(study_file), "--n-trials", "2", "--no-progress"]) == 0
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert study.best_trial.number == 1, [t.value for t in study.trials]  # lr 1e-3 learned something in 20 steps
    assert f"champion: models:/{NAME}@champion (version 2, trial 1, unconfirmed)" in capsys.readouterr().out
    best = study.best_trial
    second = client.get_model_version_by_alias(NAME, "champion")
    assert str(second.version) == "2" and second.run_id == best.user_attrs["mlflow_run_id"]
    assert second.tags["trial"] == "1" and "trial 1" in second.description
    report = json.loads((tmp_path / "runs" / NAME / "trial-1" / "report.json").read_text())["metrics"]
    assert float(second.tags["threshold"]) == pytest.approx(report["val/threshold_best"], abs=0.005)

    # The registered model, loaded by URI, gives what the trial's run folder gives, at the model's threshold.
    folder = tmp_path / "runs" / NAME / f"trial-{best.number}"
    image = sorted((tmp_path / "runs" / NAME).glob("synthetic-*/testA/*"))[0]
    threshold = report["val/threshold_best"]
    mask, removed_by_run = run_folder_outputs(folder, image, threshold)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # found through $MLFLOW_TRACKING_URI, as a user's
    out = model.predict(pd.DataFrame({"image": [image.read_bytes()], "target": [image.read_bytes()]}))
    served_mask = np.array(out["mask"][0])
    np.testing.assert_allclose(served_mask, mask, atol=1e-6)
    assert np.array_equal(np.array(out["binary_mask"][0]), (served_mask >= threshold).astype(int))
    assert np.array_equal(pixels(base64.b64decode(out["removed"][0])), pixels(removed_by_run))
    assert pixels(base64.b64decode(out["transferred"][0])).shape == (64, 64, 3)
    by_uri = ["remove", "--model", f"models:/{NAME}@champion", "--input", str(image), "--out", "by-uri"]
    assert main([*by_uri, "--device", "cpu"]) == 0  # its threshold: the model's own
    assert np.array_equal(pixels(tmp_path / "by-uri" / f"{image.stem}.png"), pixels(removed_by_run))

    # A uint8 array gives what its encoded image gives.
    as_arrays = model.predict(pd.DataFrame({"pixels": [pixels(image)], "target_pixels": [pixels(image).tolist()]}))
    np.testing.assert_array_equal(np.array(as_arrays["mask"][0]), served_mask)
    assert as_arrays["removed"][0] == out["removed"][0] and as_arrays["transferred"][0] == out["transferred"][0]
    with pytest.raises(ValueError, match="row 0: pixels must be an H x W x 3 RGB array"):
        model.predict(pd.DataFrame({"pixels": [np.zeros((8, 8, 4), np.uint8)]}))  # RGBA

    # mbu eval --model scores the registered weights as the trial's own report scored its folder.
    evaluation = ["eval", "--model", f"models:/{NAME}@champion", "--out", "eval-by-uri", "--device", "cpu"]
    assert main([*evaluation, "--no-progress"]) == 0
    by_model = json.loads((tmp_path / "eval-by-uri" / "report.json").read_text())
    assert by_model["model"] == f"models:/{NAME}@champion" and "checkpoint" not in by_model
    for key in ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones"):
        assert by_model["metrics"][key] == pytest.approx(report[key], abs=1e-9), key
    assert f"MLflow model `models:/{NAME}@champion`" in (tmp_path / "eval-by-uri" / "report.md").read_text()
    targets = sorted((tmp_path / "runs" / NAME).glob("synthetic-*/testB/*"))[:2]
    for flag, value, out in (("--run", str(folder), "t-run"), ("--model", f"runs:/{second.run_id}/model", "t-uri")):
        transfer = ["transfer", flag, value, "--guide", str(image), "--target", *map(str, targets), "--out", out]
        assert main([*transfer, "--device", "cpu"]) == 0
    for made in sorted((tmp_path / "t-run").iterdir()):
        assert np.array_equal(pixels(made), pixels(tmp_path / "t-uri" / made.name)), made.name

    # Bad model URIs: one line each, nothing written.
    parent = study_runs(client, NAME).parents[0].info.run_id  # the study's own run holds no model
    capsys.readouterr()
    for uri in (f"runs:/{parent}/model", f"models:/{NAME}@no-such-alias", f"models:/{NAME}/v2", f"models:/{NAME}/9"):
        assert main(["remove", "--model", uri, "--input", str(image), "--out", "refused"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and uri in err, err
    assert not (tmp_path / "refused").exists()

    # A confirmation names the champion again: a new version, tagged confirmed, and the alias moves to it.
    confirm = ["confirm", str(study_file), "--n-trials", "2", "--top-k", "1", "--seeds", "1", "--no-progress"]
    assert main(confirm) == 0
    assert f"champion: models:/{NAME}@champion (version 3, trial " in capsys.readouterr().out
    third = client.get_model_version_by_alias(NAME, "champion")
    assert str(third.version) == "3" and third.tags["confirmed"] == "true" and "fresh seed" in third.description
    assert main(confirm) == 0 and "unchanged" in capsys.readouterr().out


def test_a_bad_model_uri_is_one_line_and_writes_nothing(tmp_path: Path, tiny_root: Path, capsys) -> None:
    os.chdir(tmp_path)
    image = sorted((tiny_root / "testA").iterdir())[0]
    command = ["remove", "--model", "models:/no-such-model@champion", "--input", str(image), "--out", "out"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:/no-such-model@champion" in err
    assert not (tmp_path / "out").exists()


def test_a_model_uri_naming_some_other_folder_is_refused_before_anything_is_copied(
    tmp_path: Path, tiny_root: Path
) -> None:
    # A folder with a FIFO in it: copying the folder (as MLflow's download of the whole URI does) would block
    # on the FIFO forever; looking for the model's own files first refuses it at once.
    folder = tmp_path / "not-a-model"
    (folder / "artifacts").mkdir(parents=True)
    os.mkfifo(folder / "artifacts" / "pipe")
    image = sorted((tiny_root / "testA").iterdir())[0]
    command = ["remove", "--model", folder.as_uri(), "--input", str(image), "--out", str(tmp_path / "out")]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "mbu", *command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "is not a model written by mbu (no artifacts/weights.pt)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "not-a-model"]  # no copy, no output


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_masks_of_the_run_folder(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    study_file = tmp_path / "study.toml"
    study_file.write_text(tiny_study(NAME, 1, study={"registered_model": DROP}))
    assert main(["search", str(study_file), "--no-progress"]) == 0
    folder = tmp_path / "runs" / NAME / "trial-0"
    image = sorted((tmp_path / "runs" / NAME).glob("synthetic-*/testA/*"))[0]
    threshold = json.loads((folder / "report.json").read_text())["metrics"]["val/threshold_best"]
    mask, removed_by_run = run_folder_outputs(folder, image, threshold)

    port = free_port()
    command = ["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 (closed with the process)
        env=os.environ.copy(),
    )
    try:
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer in 120 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(30)
    row = answer["predictions"][0]
    np.testing.assert_allclose(np.array(row["mask"]), mask, atol=1e-6)
    # And in a fresh Python process, through MLflow's own loader, as a colleague's script would.
    script = (
        "import sys, mlflow, numpy, pandas; model = mlflow.pyfunc.load_model(sys.argv[1]); "
        "out = model.predict(pandas.DataFrame({'image': [open(sys.argv[2], 'rb').read()]})); "
        "numpy.save(sys.argv[3], numpy.array(out['mask'][0]))"
    )
    fresh = [sys.executable, "-c", script, f"models:/{NAME}@champion", str(image), str(tmp_path / "fresh.npy")]
    subprocess.run(fresh, check=True, capture_output=True, env=os.environ.copy())
    np.testing.assert_allclose(np.load(tmp_path / "fresh.npy"), mask, atol=1e-6)
    assert np.array_equal(np.array(row["binary_mask"]), (np.array(row["mask"]) >= threshold).astype(int))
    assert np.array_equal(pixels(base64.b64decode(row["removed"])), pixels(removed_by_run))
    assert row["transferred"] == ""
    assert torch.from_numpy(np.array(row["mask"])).shape == (64, 64)


def test_a_registered_model_of_another_study_is_refused_and_its_alias_stays(tmp_path: Path, capsys) -> None:
    shared = {"study": {"registered_model": "kc"}}
    (tmp_path / "first.toml").write_text(tiny_study("first", 1, **shared))
    (tmp_path / "second.toml").write_text(tiny_study("second", 1, **shared))
    assert main(["search", "first.toml", "--no-progress"]) == 0
    client = MlflowClient()
    before = client.get_model_version_by_alias("kc", "champion")
    capsys.readouterr()
    assert main(["search", "first.toml", "--summary"]) == 0
    assert "champion: models:/kc@champion (version 1, trial 0, unconfirmed)" in capsys.readouterr().out

    assert main(["search", "second.toml", "--no-progress"]) == 0  # its trials are kept; only publishing is refused

    err = capsys.readouterr().err
    assert "registered model 'kc' holds the champions of study 'first'; give study 'second' its own" in err
    after = client.get_model_version_by_alias("kc", "champion")
    assert (after.version, after.tags["study"]) == (before.version, "first")
    assert len(client.search_model_versions("name = 'kc'")) == 1


def test_a_partial_confirmation_names_no_champion_until_it_has_every_run(tmp_path: Path) -> None:
    from mbu.search.judging.registry import PARTIAL, confirmed_best

    assert confirmed_best(tmp_path) is None  # no confirmation: the best trial is the champion
    candidate = {"trial": 4, "test_iou": {"mean": 0.4, "low": 0.3, "high": 0.5, "n": 3}}
    report = {"confirmed_best": {"trial": 4}, "candidates": [candidate], "runs_finished": 5, "runs_planned": 6}
    (tmp_path / "confirm_report.json").write_text(json.dumps(report))
    assert confirmed_best(tmp_path) == PARTIAL  # a stopped top-up, or a worker still training its last run
    (tmp_path / "confirm_report.json").write_text(json.dumps({**report, "runs_finished": 6}))
    assert confirmed_best(tmp_path) == (4, candidate)


def test_train_log_model_scores_the_run_and_logs_a_model_that_loads_by_uri(
    tmp_path: Path, tiny_root: Path, capsys
) -> None:
    os.chdir(tmp_path)
    argv = ["train", "--root", str(tiny_root), "--out", "run", "--iters", "4", "--bs", "4", "--resize", "64"]
    assert main([*argv, "--device", "cpu", "--no-progress", "--log-model"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert line.startswith(f"model: runs:/{run_id}/model (threshold ")
    report = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert f"threshold {report['val/threshold_best']:.2f} chosen on validation" in line

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test/iou"] == pytest.approx(report["test/iou"])
    assert "report.json" in {item.path for item in client.list_artifacts(run_id)}
    image = sorted((tiny_root / "testA").iterdir())[0]
    mask, _ = run_folder_outputs(tmp_path / "run", image, report["val/threshold_best"])
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"image": [image.read_bytes()]}))
    np.testing.assert_allclose(np.array(predicted["mask"][0]), mask, atol=1e-6)
    expected = (np.array(predicted["mask"][0]) >= report["val/threshold_best"]).astype(int)
    assert np.array_equal(np.array(predicted["binary_mask"][0]), expected)

    # A data root without annotated images: the model takes 0.5, and the line says why.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_root, bare, ignore=shutil.ignore_patterns("*_masks"))
    argv = ["train", "--root", str(bare), "--out", "bare-run", "--iters", "2", "--bs", "4", "--resize", "64"]
    assert main([*argv, "--device", "cpu", "--no-progress", "--log-model"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))
    assert "threshold 0.5: " in line and "has 0 annotated test A images, and choosing one needs at least 2" in line
    assert not (tmp_path / "bare-run" / "report.json").exists()


def test_a_model_upload_cut_short_is_one_line_and_a_relaunch_logs_it_whole(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault injected at the artifact store's write keeps half of weights.pt (a full disk): the publish says so
    and registers nothing; the next launch finds the model incomplete, logs it again and registers it."""
    import mlflow.store.artifact.local_artifact_repo as local_repo

    copy = local_repo.shutil_copytree_without_file_permissions

    def copy_cut_short(source: str, destination: str) -> None:
        copy(source, destination)
        for weights in Path(destination).rglob("weights.pt"):
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    monkeypatch.setattr(local_repo, "shutil_copytree_without_file_permissions", copy_cut_short)
    (tmp_path / "cut.toml").write_text(tiny_study("cut", 1, study={"registered_model": DROP}))
    assert main(["search", "cut.toml", "--no-progress"]) == 0  # the trials are kept; the champion is not
    err = capsys.readouterr().err
    assert "the champion was not registered (WriteError: the model's weights.pt reached the artifact store" in err
    client = MlflowClient()
    assert not client.search_model_versions("name = 'cut'")

    monkeypatch.setattr(local_repo, "shutil_copytree_without_file_permissions", copy)
    assert main(["search", "cut.toml", "--no-progress"]) == 0
    run_id = client.get_model_version_by_alias("cut", "champion").run_id
    sizes = {item.path: item.file_size for item in client.list_artifacts(run_id, "model/artifacts")}
    settings = json.loads(
        Path(client.download_artifacts(run_id, "model/artifacts/model.json", str(tmp_path))).read_text()
    )
    assert sizes["model/artifacts/weights.pt"] == settings["weights_bytes"] > 0  # logged again, whole
    image = sorted((tmp_path / "runs" / "cut").glob("synthetic-*/testA/*"))[0]
    out = mlflow.pyfunc.load_model("models:/cut@champion").predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert len(out) == 1
