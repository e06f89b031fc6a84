"""Training grids, `mbu transfer` and `mbu remove` on a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import tiny_train_config
from PIL import Image

from mbu.cli import main
from mbu.data.images import decode_image, to_model_range
from mbu.evaluate.report import load_model
from mbu.train.loop import train
from mbu.train.tracking import Recorder
from mbu.train.visuals import PAD


@pytest.fixture(scope="module")
def trained_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    recorder = Recorder.start(uri, "grids", "run")
    # A high lr: after 2 iterations the masks already depend on their inputs beyond PNG rounding.
    cfg = tiny_train_config(tiny_root, out, iters=2, display_iter=1, num_display=3, lr=2e-2)
    train(cfg, progress=False, recorder=recorder)
    recorder.end()
    (out / "run_id").write_text(recorder.run_id)
    (out / "tracking_uri").write_text(uri)
    return out


def _cells(path: Path, side: int = 64) -> list[np.ndarray]:
    """The image cells of a 4 x 4 framed grid (first row and column are the inputs)."""
    grid = np.asarray(Image.open(path))
    step = side + PAD
    return [
        grid[PAD + r * step : PAD + r * step + side, PAD + c * step : PAD + c * step + side]
        for r in range(1, 4)
        for c in range(1, 4)
    ]


def test_grids_saved_every_display_iter_and_logged_with_steps(trained_run: Path) -> None:
    names = sorted(p.name for p in (trained_run / "grids").iterdir())
    for kind in ("transfer", "transfer_masks", "segmentation", "reconstruction", "removal"):
        assert f"{kind}_0000001.png" in names and f"{kind}_0000002.png" in names, kind
    grid = np.asarray(Image.open(trained_run / "grids" / "transfer_0000002.png"))
    assert grid.shape == (4 * 64 + 5 * PAD, 4 * 64 + 5 * PAD, 3)  # 3 guides + header row, 3 targets + column
    masks = _cells(trained_run / "grids" / "transfer_masks_0000002.png")
    assert len({m.tobytes() for m in masks}) > 1, "every cell shows the same mask"
    client = mlflow.MlflowClient((trained_run / "tracking_uri").read_text())
    run_id = (trained_run / "run_id").read_text()
    logged = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("transfer" in p for p in logged) and any("segmentation" in p for p in logged)


def test_transfer_writes_every_pair_and_a_grid(trained_run: Path, tiny_root: Path, tmp_path: Path) -> None:
    guides = sorted((tiny_root / "testA").iterdir())[:2]
    targets = sorted((tiny_root / "testB").iterdir())[:3]
    code = main(
        ["transfer", "--run", str(trained_run), "--guide", *map(str, guides), "--target", *map(str, targets)]
        + ["--out", str(tmp_path / "t"), "--device", "cpu"]
    )
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert len(written) == 2 * 3 + 1 and "transfer_grid.png" in written
    assert f"{guides[0].stem}__on__{targets[2].stem}.png" in written


def test_remove_handles_a_short_last_batch_and_keeps_unmasked_pixels(
    trained_run: Path, tiny_root: Path, tmp_path: Path
) -> None:
    inputs = sorted((tiny_root / "testA").iterdir())[:5]
    code = main(
        ["remove", "--run", str(trained_run), "--input", *map(str, inputs), "--threshold", "0.5"]
        + ["--out", str(tmp_path / "r"), "--bs", "2", "--device", "cpu"]
    )
    assert code == 0
    outputs = sorted((tmp_path / "r").iterdir())
    assert [p.stem for p in outputs] == [p.stem for p in inputs]
    model, _, _ = load_model(trained_run, "cpu")
    original = decode_image(inputs[4], 64)
    mask = model.segment(to_model_range(torch.from_numpy(original).permute(2, 0, 1)[None]))[0, 0] >= 0.5
    removed = np.asarray(Image.open(outputs[4]))
    keep = ~mask.numpy()
    assert keep.any()
    assert np.array_equal(removed[keep], original[keep])


def test_remove_rejects_a_bad_threshold_and_missing_input(trained_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["remove", "--run", str(trained_run), "--input", "x.png", "--threshold", "2", "--out", "o"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err
    assert main(["remove", "--run", str(trained_run), "--input", "nowhere.png", "--out", "o"]) == 2
    assert "nowhere.png does not exist" in capsys.readouterr().err


def test_remove_defaults_to_a_scored_runs_own_threshold_and_says_which_and_the_size(
    trained_run: Path, tiny_root: Path, tmp_path: Path, capsys
) -> None:
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = sorted((tiny_root / "testA").iterdir())[0]
    remove = ["remove", "--run", str(run), "--input", str(image), "--device", "cpu"]
    assert main([*remove, "--out", str(tmp_path / "unscored")]) == 0
    assert "threshold 0.50 (the model's own), 64x64 px" in capsys.readouterr().out  # no report: 0.5

    assert main(["eval", "--run", str(run)]) == 0  # the run's report now holds its validation-chosen threshold
    chosen = json.loads((run / "report.json").read_text())["metrics"]["val/threshold_best"]
    assert chosen != 0.5  # else the default could not be told from the old one
    capsys.readouterr()
    assert main([*remove, "--out", str(tmp_path / "default")]) == 0
    assert f"threshold {chosen:.2f} (the model's own)" in capsys.readouterr().out
    assert main([*remove, "--out", str(tmp_path / "explicit"), "--threshold", str(chosen)]) == 0
    assert "(given by --threshold)" in capsys.readouterr().out
    default, explicit = (np.asarray(Image.open(tmp_path / d / f"{image.stem}.png")) for d in ("default", "explicit"))
    assert np.array_equal(default, explicit)
