"""``[study] keep_checkpoints``: the N best complete trials keep full checkpoints, the rest their weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import torch
from helpers import tiny_study

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.cli import main
from mbu.search.running.checkpoints import folders_to_thin
from mbu.train.checkpoint import keep_weights_only, load_checkpoint
from mbu.train.model import MODEL_VERSION

TrialState = optuna.trial.TrialState


def _add(study: optuna.Study, state: TrialState, value: float | None = None, retry_of: list[int] | None = None) -> None:
    attrs = {"retry_history": retry_of} if retry_of else {}
    study.add_trial(optuna.trial.create_trial(state=state, value=value, system_attrs=attrs))


def test_only_finished_tries_beyond_the_best_lose_their_optimizer_state() -> None:
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 0.30)  # 0
    _add(study, TrialState.FAIL)  # 1: retried by 4, which finished: done with
    _add(study, TrialState.COMPLETE, 0.50)  # 2: the best
    _add(study, TrialState.PRUNED)  # 3
    _add(study, TrialState.COMPLETE, 0.40, retry_of=[1])  # 4: second best
    _add(study, TrialState.FAIL)  # 5: its retry (6) still runs and resumes from it
    _add(study, TrialState.RUNNING, retry_of=[5])  # 6
    assert folders_to_thin(study, keep=2) == [0, 1, 3]
    assert folders_to_thin(study, keep=1) == [0, 1, 3, 4]
    minimize = optuna.create_study(direction="minimize")
    for value in (0.3, 0.1, 0.2):
        _add(minimize, TrialState.COMPLETE, value)
    assert folders_to_thin(minimize, keep=1) == [0, 2]


def test_a_study_keeping_one_checkpoint_leaves_every_trial_evaluable_and_none_resumable(tmp_path: Path, capsys) -> None:
    os.chdir(tmp_path)
    train = {"iters": 4, "progress_iter": 2}
    (tmp_path / "study.toml").write_text(tiny_study("thin", 3, study={"keep_checkpoints": 1}, train=train))
    assert main(["search", "study.toml", "--no-progress"]) == 0
    study = optuna.load_study(study_name="thin", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best = study.best_trial.number
    folders = {t.number: tmp_path / "runs" / "thin" / f"trial-{t.number}" for t in study.trials}
    states = {n: load_checkpoint(folder) for n, folder in folders.items()}
    full = [n for n, state in states.items() if not state.get("weights_only")]
    assert full == [best] and len(states) == 3
    # The thinned weights are the trained ones: a fresh mbu eval of a thinned trial gives its search-time IoU.
    thinned = min(n for n in states if n != best)
    assert main(["eval", "--run", str(folders[thinned]), "--no-progress"]) == 0
    report = json.loads((folders[thinned] / "report.json").read_text())["metrics"]
    assert report["val/iou_best"] == pytest.approx(study.trials[thinned].value, abs=1e-6)
    assert (
        folders[thinned].joinpath(CHECKPOINT_FILE).stat().st_size * 2
        < folders[best].joinpath(CHECKPOINT_FILE).stat().st_size
    )
    markdown = (tmp_path / "runs" / "thin" / "study_report.md").read_text()
    assert "Disk used by the study's runs: " in markdown
    recorded = json.loads((tmp_path / "runs" / "thin" / "study_report.json").read_text())["disk_bytes"]
    assert recorded > sum(folder.joinpath(CHECKPOINT_FILE).stat().st_size for folder in folders.values())

    # Resuming a thinned checkpoint: one line why not, and nothing written.
    capsys.readouterr()
    resume = ["train", "--load", str(folders[thinned]), "--out", "resumed", "--iters", "8", "--no-progress"]
    assert main(resume) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keeps the weights only" in err and "not resumed" in err
    assert not (tmp_path / "resumed").exists()


def test_thinning_keeps_the_weights_bit_for_bit_and_is_done_once(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    model = torch.nn.Linear(64, 64)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    adam.step()
    config = {"resize": 64, "sep": 25}
    state = {"model": model.state_dict(), "opt": adam.state_dict(), "iteration": 3, "model_version": MODEL_VERSION}
    torch.save({**state, "config": config, "rng_cpu": torch.get_rng_state()}, path)
    before = path.stat().st_size
    freed = keep_weights_only(path)
    thinned = load_checkpoint(path)
    assert freed == before - path.stat().st_size > 0
    assert set(thinned) == {"model", "config", "iteration", "model_version", "weights_only"}
    assert all(torch.equal(thinned["model"][k], v) for k, v in model.state_dict().items())
    assert keep_weights_only(path) == 0
