"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mbu.base.command import UserError
from mbu.base.files import atomic_write
from mbu.base.run_files import CHECKPOINT_FILE
from mbu.train.model import MODEL_VERSION


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or for another model."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Tensors, numbers, strings and containers only (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: all mean "unusable"
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(path, err)}") from err
    missing = {"model", "config", "iteration"} - set(state)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    check_model_version(state, path)
    return state


def _load_failure(path: Path, err: Exception) -> str:
    """Why ``torch.load`` refused ``path``, in a few words (PyTorch's own text runs to a paragraph)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split("\n", 1)[0]
        detail = detail.split(" Please use ", 1)[0].rstrip(". ")
        return f"it holds more than tensors, or is corrupt ({detail[:200]})"
    first = text.strip().split("\n", 1)[0][:200] or type(err).__name__
    return f"truncated or corrupt ({first})"


# The keys a weights-only checkpoint keeps: enough to evaluate, transfer and remove, not to resume.
WEIGHTS_KEYS = ("model", "config", "iteration", "model_version")


def keep_weights_only(path: Path) -> int:
    """Rewrite the checkpoint at ``path`` without its optimizer and RNG state; the bytes freed.

    Reports, ``mbu eval``, ``mbu transfer`` and ``mbu remove`` read only the weights and the config, so
    they work on it unchanged; a resume is refused (:func:`check_resumable`). Already thinned: nothing done.
    """
    path = Path(path)
    before = path.stat().st_size
    state = load_checkpoint(path)
    if state.get("weights_only"):
        return 0
    save_checkpoint(path, weights_only_state(state))
    return before - path.stat().st_size


def weights_only_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state without its optimizer and RNG state, marked ``weights_only``."""
    return {**{key: state[key] for key in WEIGHTS_KEYS if key in state}, "weights_only": True}


def check_resumable(state: dict[str, Any], source: Path) -> None:
    """Refuse to resume from a weights-only checkpoint: its Adam moments are gone, so it cannot continue."""
    if state.get("weights_only"):
        raise CheckpointError(
            f"checkpoint {source} keeps the weights only ([study].keep_checkpoints dropped its optimizer state "
            "once its trial had finished): it can be evaluated, not resumed; train again without --load"
        )


def check_model_version(state: dict[str, Any], source: Path) -> None:
    """Refuse weights trained for another model: they would load, and silently compute something else."""
    version = state.get("model_version", 1)  # mbu 0.1 wrote no version
    if version == MODEL_VERSION:
        return
    if version == 1:
        raise CheckpointError(
            f"checkpoint {source} was trained by mbu 0.1, whose decoders used ReLU where the paper's model "
            "(and this version) uses LeakyReLU(0.2); its weights do not fit this model: train it again"
        )
    raise CheckpointError(f"checkpoint {source} is of model version {version}; this mbu reads version {MODEL_VERSION}")


def check_architecture(state: dict[str, Any], resize: int, sep: int, source: Path) -> None:
    """Refuse a checkpoint of another architecture, naming what differs."""
    saved = state["config"]
    diffs = [
        f"{name}: checkpoint {saved.get(name)}, requested {want}"
        for name, want in (("resize", resize), ("sep", sep))
        if saved.get(name) != want
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {source} is for another architecture ({'; '.join(diffs)})")
