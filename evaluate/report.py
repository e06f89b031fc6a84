"""``report.json`` for a run folder: the scores, and what they were computed from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evaluate.segmentation import REPORT_FILE, SegmentationScores, evaluate_model, load_test_annotations
from train.checkpoint import CHECKPOINT_FILE, load_checkpoint, write_json
from train.config import TrainConfig
from train.loop import resolve_device
from train.model import ContentTransferModel


def load_model(run_dir: Path, device: str = "auto") -> tuple[ContentTransferModel, TrainConfig, int]:
    """The trained model of a run folder (eval mode), its config and iteration."""
    state = load_checkpoint(Path(run_dir), map_location="cpu")
    cfg = TrainConfig.from_dict(state["config"])
    model = ContentTransferModel(cfg.model_config())
    model.load_state_dict(state["model"])
    model.to(resolve_device(device)).eval()
    return model, cfg, int(state["iteration"])


def build_report(scores: SegmentationScores, cfg: TrainConfig, checkpoint: Path, iteration: int) -> dict[str, Any]:
    return {
        **scores.to_dict(),
        "checkpoint": str(checkpoint),
        "iteration": iteration,
        "config": cfg.to_dict(),
    }


def evaluate_run(
    run_dir: Path, root: str | None = None, device: str = "auto", split_seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Score a run folder's checkpoint on ``root`` (default: the root it trained on)."""
    run_dir = Path(run_dir)
    model, cfg, iteration = load_model(run_dir, device)
    annotated = load_test_annotations(Path(root or cfg.root), cfg.resize, progress)
    with torch.no_grad():
        scores = evaluate_model(model, annotated, split_seed)
    report = build_report(scores, cfg, run_dir / CHECKPOINT_FILE, iteration)
    write_json(run_dir / REPORT_FILE, report)
    return report
