"""The captured training step (CUDA graph) against the eager one. CUDA only: bench/gpu_check.sh runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.train.loop import Training, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def step_losses(cfg_kwargs: dict, root: Path, out: Path, iterations: int) -> list[dict[str, float]]:
    """Every iteration's loss terms, through ``Training.step`` (the path populations use), logged each step."""
    cfg = tiny_train_config(root, out, device="cuda", iters=iterations, progress_iter=1, **cfg_kwargs)
    training = Training(cfg, progress=False)
    rows = []
    while not training.done():
        training.step()
        rows.append(dict(training.metrics))
    training.close()
    return rows


def test_captured_and_eager_steps_give_the_same_losses_over_20_iterations(tiny_root: Path, tmp_path: Path) -> None:
    torch.backends.cudnn.deterministic = True  # the _isolated fixture restores it
    eager = step_losses({}, tiny_root, tmp_path / "eager", 20)
    captured = step_losses({"cuda_graph": True}, tiny_root, tmp_path / "captured", 20)
    assert len(captured) == 20
    for i, (e, c) in enumerate(zip(eager, captured, strict=True)):
        assert len(c) >= 9 and c.keys() == e.keys()  # total, discriminator and the seven weighted terms
        assert c == pytest.approx(e, abs=1e-5, rel=1e-5), f"iteration {i + 1}"


def test_checkpoints_move_between_captured_and_eager_runs(tiny_root: Path, tmp_path: Path) -> None:
    graphed = tmp_path / "graphed"
    train(tiny_train_config(tiny_root, graphed, device="cuda", iters=6, cuda_graph=True), progress=False)
    eager = tmp_path / "eager"
    result = train(tiny_train_config(tiny_root, eager, device="cuda", iters=10, load=str(graphed)), progress=False)
    assert result.start == 6 and result.iterations == 10
    back = tmp_path / "back"
    result = train(
        tiny_train_config(tiny_root, back, device="cuda", iters=14, load=str(eager), cuda_graph=True), progress=False
    )
    assert result.start == 10 and result.iterations == 14
    state = torch.load(back / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
