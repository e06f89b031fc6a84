from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.train.checkpoint import CheckpointError, load_checkpoint
from mbu.train.loop import NonFiniteLossError, train


def test_training_writes_checkpoint_and_changes_weights(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_train_config(tiny_root, tmp_path / "run")
    result = train(cfg, progress=False)
    state = load_checkpoint(tmp_path / "run")
    assert state["iteration"] == 4 == result.iterations
    assert state["config"]["bs"] == 4
    fresh = type(result.model)(cfg.model_config()).state_dict()
    changed = [k for k, v in state["model"].items() if v.dtype.is_floating_point and not torch.equal(v, fresh[k])]
    assert changed, "training did not change any weight"
    assert set(result.metrics) >= {"train/loss_total", "train/loss_recon1_a", "train/loss_disc"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


def test_eval_callback_runs_every_n_iterations(tiny_root: Path, tmp_path: Path) -> None:
    seen = []
    cfg = tiny_train_config(tiny_root, tmp_path / "run", iters=6, eval_every=2)
    train(cfg, on_eval=lambda it, model: seen.append((it, model.training)) or None, progress=False)
    assert seen == [(2, False), (4, False), (6, False)]  # evaluated in eval mode


def test_non_finite_loss_stops_within_one_progress_interval(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_train_config(tiny_root, tmp_path / "run", lr=1e12, disclr=1e12, iters=40, progress_iter=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration \d+"):
        train(cfg, progress=False)


def test_resume_continues_exactly(tiny_root: Path, tmp_path: Path) -> None:
    """N iterations straight equal N/2, a checkpoint, and N/2 more from it."""
    torch.use_deterministic_algorithms(True)
    try:
        straight = train(tiny_train_config(tiny_root, tmp_path / "straight", iters=4), progress=False)
        train(tiny_train_config(tiny_root, tmp_path / "half", iters=2), progress=False)
        resumed = train(
            tiny_train_config(tiny_root, tmp_path / "resumed", iters=4, load=str(tmp_path / "half")), progress=False
        )
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed.iterations == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_of_another_architecture_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    train(tiny_train_config(tiny_root, tmp_path / "run", iters=1), progress=False)
    with pytest.raises(CheckpointError, match="sep: checkpoint 25, requested 30"):
        train(tiny_train_config(tiny_root, tmp_path / "other", sep=30, load=str(tmp_path / "run")), progress=False)


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"channels_last": True}])
def test_speed_options_train_and_save_a_loadable_checkpoint(tiny_root: Path, tmp_path: Path, options: dict) -> None:
    result = train(tiny_train_config(tiny_root, tmp_path / "run", iters=2, **options), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    state = load_checkpoint(tmp_path / "run")
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # weights stay float32


@pytest.mark.slow
def test_compiled_losses_match_eager_losses(tiny_root: Path, tmp_path: Path) -> None:
    """Same initial weights and batch: the compiled step computes the eager step's losses."""
    cfg = dict(iters=1, progress_iter=1)
    eager = train(tiny_train_config(tiny_root, tmp_path / "eager", **cfg), progress=False)
    compiled = train(tiny_train_config(tiny_root, tmp_path / "compiled", compile=True, **cfg), progress=False)
    assert eager.metrics.keys() == compiled.metrics.keys()
    for key, value in eager.metrics.items():
        # The discriminator's loss comes after the first Adam update, a sign step (g / |g|) that
        # turns float rounding in near-zero gradients into whole +-lr moves: eager vs compiled
        # differ there by ~1e-4 with PyTorch's stock kernels too. The other terms come before it.
        rel = 1e-3 if key == "train/loss_disc" else 1e-5
        assert compiled.metrics[key] == pytest.approx(value, rel=rel), key


def test_bad_amp_mode_is_rejected(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp must be one of"):
        tiny_train_config(tiny_root, tmp_path, amp="fp8")


def test_checkpoint_of_the_relu_decoder_model_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    """mbu 0.1 wrote no model version: its decoders were ReLU, so its weights are refused with the reason."""
    train(tiny_train_config(tiny_root, tmp_path / "run", iters=1), progress=False)
    path = tmp_path / "run" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    assert state.pop("model_version") == 2
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"trained by mbu 0\.1.*ReLU.*LeakyReLU\(0\.2\).*train it again"):
        load_checkpoint(tmp_path / "run")


def _disc_gradient_norm_after_step(disc_clip: float) -> float:
    from mbu.train.losses import LossWeights
    from mbu.train.model import ContentTransferModel, ModelConfig
    from mbu.train.step import Optimizers, train_step

    torch.manual_seed(0)
    model = ContentTransferModel(ModelConfig(resize=64))
    a, b = torch.rand(2, 4, 3, 64, 64) * 2 - 1
    train_step(model, Optimizers.create(model, 2e-4, 2e-4), a, b, LossWeights(), disc_clip=disc_clip)
    return torch.cat([p.grad.flatten() for p in model.disc.parameters()]).norm().item()


def test_discriminator_clip_is_off_by_default_and_an_option() -> None:
    """Default: no discriminator clip, as the reference's code ran; ``disc_clip`` clips it when asked."""
    from mbu.train.config import TrainConfig

    assert TrainConfig().disc_clip == 0
    unclipped = _disc_gradient_norm_after_step(0.0)
    assert unclipped > 0.01
    assert _disc_gradient_norm_after_step(unclipped / 10) == pytest.approx(unclipped / 10, rel=1e-4)
    with pytest.raises(ValueError, match="disc_clip must be"):
        TrainConfig(disc_clip=-1.0)


def test_optimizer_state_keeps_this_runs_capturable_option(tiny_root: Path, tmp_path: Path) -> None:
    """A checkpoint written by a captured (CUDA graph) run resumes eagerly here, and on CPU."""
    from mbu.train.step import Optimizers, build_model

    cfg = tiny_train_config(tiny_root, tmp_path / "run", iters=2)
    train(cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for key in ("opt_autoencoder", "opt_disc"):  # as a captured run writes them
        for group in state[key]["param_groups"]:
            group["capturable"] = True
    model = build_model(cfg, torch.device("cpu"))
    optimizers = Optimizers.create(model, cfg.lr, cfg.disclr)
    optimizers.load_state_dict(state)
    groups = optimizers.autoencoder.param_groups + optimizers.disc.param_groups
    assert [g["capturable"] for g in groups] == [False] * len(groups)
    assert int(optimizers.autoencoder.state[next(iter(model.autoencoder_parameters()))]["step"]) == 2
