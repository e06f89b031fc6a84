"""The study's champion as an MLflow model: registered, aliased, loaded by URI and served over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
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
from helpers import DROP, free_port, tiny_study
from mbu.data.images import decode_images, to_model_range
from mbu.evaluate.report import load_model
from mlflow.tracking import MlflowClient
from PIL import Image

from mbu.cli import main

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


def test_the_champion_is_registered_aliased_moved_by_a_confirmation_and_used_by_uri(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    study_file = tmp_path / "study.toml"
    study_file.write_text(tiny_study(NAME, 2, study={"seed": 3, "registered_model": DROP}, enqueue=[{"lr": 2e-4}]))
    assert main(["search", str(study_file), "--no-progress"]) == 0
    assert f"champion: models:/{NAME}@champion (version 1, trial " in capsys.readouterr().out
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best = study.best_trial
    first = client.get_model_version_by_alias(NAME, "champion")
    assert first.run_id == best.user_attrs["mlflow_run_id"] and first.tags["unconfirmed"] == "true"
    assert first.tags["trial"] == str(best.number) and f"trial {best.number}" in first.description
    report = json.loads((tmp_path / "runs" / NAME / f"trial-{best.number}" / "report.json").read_text())["metrics"]
    assert float(first.tags["threshold"]) == pytest.approx(report["val/threshold_best"], abs=0.005)

    # A relaunch with the same champion changes nothing.
    assert main(["search", str(study_file), "--no-progress"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1

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
    targets = sorted((tmp_path / "runs" / NAME).glob("synthetic-*/testB/*"))[:2]
    for flag, value, out in (("--run", str(folder), "t-run"), ("--model", f"runs:/{first.run_id}/model", "t-uri")):
        transfer = ["transfer", flag, value, "--guide", str(image), "--target", *map(str, targets), "--out", out]
        assert main([*transfer, "--device", "cpu"]) == 0
    for made in sorted((tmp_path / "t-run").iterdir()):
        assert np.array_equal(pixels(made), pixels(tmp_path / "t-uri" / made.name)), made.name

    # Bad model URIs: one line each, nothing written.
    other = next(t for t in study.trials if t.number != best.number).user_attrs["mlflow_run_id"]
    capsys.readouterr()
    for uri in (f"runs:/{other}/model", f"models:/{NAME}@no-such-alias"):
        assert main(["remove", "--model", uri, "--input", str(image), "--out", "refused"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and uri in err, err
    assert not (tmp_path / "refused").exists()

    # A confirmation names the champion again: a new version, tagged confirmed, and the alias moves to it.
    confirm = ["confirm", str(study_file), "--top-k", "1", "--seeds", "1", "--no-progress"]
    assert main(confirm) == 0
    assert f"champion: models:/{NAME}@champion (version 2, trial " in capsys.readouterr().out
    second = client.get_model_version_by_alias(NAME, "champion")
    assert str(second.version) == "2" and second.tags["confirmed"] == "true" and "fresh seed" in second.description
    assert main(confirm) == 0 and "unchanged" in capsys.readouterr().out


def test_a_bad_model_uri_is_one_line_and_writes_nothing(tmp_path: Path, tiny_root: Path, capsys) -> None:
    os.chdir(tmp_path)
    image = sorted((tiny_root / "testA").iterdir())[0]
    command = ["remove", "--model", "models:/no-such-model@champion", "--input", str(image), "--out", "out"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:/no-such-model@champion" in err
    assert not (tmp_path / "out").exists()


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
    assert np.array_equal(np.array(row["binary_mask"]), (np.array(row["mask"]) >= threshold).astype(int))
    assert np.array_equal(pixels(base64.b64decode(row["removed"])), pixels(removed_by_run))
    assert row["transferred"] == ""
    assert torch.from_numpy(np.array(row["mask"])).shape == (64, 64)


def test_a_partial_confirmation_names_no_champion_until_it_has_every_run(tmp_path: Path) -> None:
    from mbu.search.registry import PARTIAL, confirmed_best

    assert confirmed_best(tmp_path) is None  # no confirmation: the best trial is the champion
    candidate = {"trial": 4, "test_iou": {"mean": 0.4, "low": 0.3, "high": 0.5, "n": 3}}
    report = {"confirmed_best": {"trial": 4}, "candidates": [candidate], "runs_finished": 5, "runs_planned": 6}
    (tmp_path / "confirm_report.json").write_text(json.dumps(report))
    assert confirmed_best(tmp_path) == PARTIAL  # a stopped top-up, or a worker still training its last run
    (tmp_path / "confirm_report.json").write_text(json.dumps({**report, "runs_finished": 6}))
    assert confirmed_best(tmp_path) == (4, candidate)
