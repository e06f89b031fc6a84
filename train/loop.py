"""One training loop: the reference's alternating autoencoder / discriminator updates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mbu.data.batches import DomainBatches
from mbu.data.images import DomainImages, load_display_images, load_domain, to_model_range
from mbu.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    check_architecture,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from mbu.train.config import TrainConfig
from mbu.train.model import MODEL_VERSION, ContentTransferModel
from mbu.train.step import (
    LossFunctions,
    NonFiniteLossError,
    Optimizers,
    build_model,
    memory_layout,
    place_dataset,
    resolve_device,
    train_step,
)
from mbu.train.tracking import Recorder
from mbu.train.visuals import training_grids
from PIL import Image
from tqdm import tqdm

SKIPPED_FILE = "skipped_images.txt"

# Called every ``eval_every`` iterations with (iteration, model in eval mode); may
# return metrics to log, and may raise (e.g. optuna.TrialPruned) to stop training.
EvalCallback = Callable[[int, ContentTransferModel], "dict[str, float] | None"]


@dataclass
class TrainResult:
    model: ContentTransferModel
    iterations: int  # iterations completed in total (including any resumed ones)
    metrics: dict[str, float] = field(default_factory=dict)  # last logged train/... values
    run_dir: Path = Path(".")
    start: int = 0  # the checkpoint's iteration when resumed, else 0


@dataclass
class TrainStatus:
    """Where a training stands, kept current by :func:`train` for a caller that is interrupted."""

    iteration: int = 0  # iterations completed
    saved: int = 0  # iteration of the last checkpoint written (0: none yet)


# What ``train`` writes into a run folder (with CONFIG_FILE and CHECKPOINT_FILE).
GRIDS_DIR = "grids"


def save_grids(
    model: ContentTransferModel,
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    run_dir: Path,
    iteration: int,
    recorder: Recorder,
) -> None:
    """Write every grid to ``run_dir/grids/`` and to the run's MLflow images at this step."""
    was_training = model.training
    grids = training_grids(model, images_a, images_b)
    model.train(was_training)
    folder = run_dir / GRIDS_DIR
    folder.mkdir(exist_ok=True)
    for name, array in grids.items():
        Image.fromarray(array).save(folder / f"{name}_{iteration:07d}.png")
        recorder.log_image(array, key=name, step=iteration)


def record_skipped(domains: list[DomainImages], run_dir: Path, recorder: Recorder) -> None:
    """With ``skip_bad``, list the files left out in ``run_dir/skipped_images.txt`` (and in MLflow)."""
    skipped = [line for domain in domains for line in domain.skipped]
    if not skipped:
        return
    path = run_dir / SKIPPED_FILE
    path.write_text("\n".join(skipped) + "\n")
    recorder.log_artifact(path)
    recorder.set_tags({"skipped_images": len(skipped)})


def _checkpoint_state(model: ContentTransferModel, optimizers: Optimizers, iteration: int, cfg: TrainConfig) -> dict:
    return {
        "model": model.state_dict(),
        "opt_autoencoder": optimizers.autoencoder.state_dict(),
        "opt_disc": optimizers.disc.state_dict(),
        "iteration": iteration,
        "model_version": MODEL_VERSION,
        "config": cfg.to_dict(),
        # Batches and flips depend only on (seed, iteration); the global RNG is saved for
        # anything random added later, and restored on resume.
        "rng_cpu": torch.get_rng_state(),
    }


def train(
    cfg: TrainConfig,
    on_eval: EvalCallback | None = None,
    progress: bool = True,
    status: TrainStatus | None = None,
    recorder: Recorder | None = None,
) -> TrainResult:
    """Train on ``cfg.root`` into ``cfg.out``; losses, grids and eval metrics go to ``recorder``'s run.

    Checkpoints go to ``out/checkpoint.pt`` every ``save_iter`` iterations and at
    the end. With ``cfg.load`` set, training resumes from that folder's
    checkpoint and continues exactly where it stopped (batches depend only on
    the seed and the iteration). Raises :class:`NonFiniteLossError` within one
    ``progress_iter`` interval of the loss becoming NaN or infinite. ``status``,
    when given, follows the iteration and the last checkpoint written.
    """
    status = status if status is not None else TrainStatus()
    recorder = recorder if recorder is not None else Recorder.off()
    device = resolve_device(cfg.device, cfg.gpu)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, cfg.to_dict())

    # Data: decoded once, kept as uint8 on the training device when it fits there.
    domains = [load_domain(Path(cfg.root), name, cfg.resize, progress, cfg.skip_bad) for name in ("trainA", "trainB")]
    record_skipped(domains, run_dir, recorder)
    train_a, train_b = (place_dataset(domain.images, device) for domain in domains)
    batches_a = DomainBatches(train_a, cfg.bs, cfg.seed, domain=0, device=device)
    batches_b = DomainBatches(train_b, cfg.bs, cfg.seed, domain=1, device=device)
    display_a, display_b = (
        to_model_range(x.to(device))
        for x in load_display_images(Path(cfg.root), cfg.resize, cfg.num_display, cfg.skip_bad)
    )

    # Model and optimizers, fresh or resumed.
    model = build_model(cfg, device)
    optimizers = Optimizers.create(model, cfg.lr, cfg.disclr)
    start = 0
    if cfg.load:
        state = load_checkpoint(Path(cfg.load), map_location=device)
        check_architecture(state, cfg.resize, cfg.sep, Path(cfg.load))
        model.load_state_dict(state["model"])
        optimizers.autoencoder.load_state_dict(state["opt_autoencoder"])
        optimizers.disc.load_state_dict(state["opt_disc"])
        start = int(state["iteration"])
        status.iteration = start
        if Path(cfg.load).resolve() == run_dir.resolve():
            status.saved = start  # resuming in place: that checkpoint is this run's last one
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"].cpu())

    layout = memory_layout(cfg)
    loss_fns = LossFunctions.create(cfg.compile)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    metrics: dict[str, float] = {}
    model.train()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc="train", disable=not progress, unit="it")
    for iteration in bar:
        a = batches_a.batch(iteration).contiguous(memory_format=layout)
        b = batches_b.batch(iteration).contiguous(memory_format=layout)
        total, terms, disc_loss = train_step(
            model, optimizers, a, b, cfg.weights, cfg.amp == "bf16", loss_fns, cfg.disc_clip
        )
        # Sums stay on the device: no host sync until the interval ends.
        for name, value in {
            "loss_total": total,
            "loss_disc": disc_loss,
            **{f"loss_{k}": v for k, v in terms.items()},
        }.items():
            sums[name] = sums[name] + value if name in sums else value.clone()
        count += 1
        done = status.iteration = iteration + 1

        if done % cfg.progress_iter == 0 or done == cfg.iters:
            metrics = {f"train/{k}": v.item() / count for k, v in sums.items()}
            sums, count = {}, 0
            if not math.isfinite(metrics["train/loss_total"]) or not math.isfinite(metrics["train/loss_disc"]):
                raise NonFiniteLossError(f"non-finite loss at iteration {done}")
            recorder.log_metrics(metrics, step=done)
            bar.set_postfix(loss=f"{metrics['train/loss_total']:.4f}")

        if done % cfg.display_iter == 0 and done != cfg.iters:
            save_grids(model, display_a, display_b, run_dir, done, recorder)

        if done % cfg.save_iter == 0 and done != cfg.iters:
            save_checkpoint(run_dir / CHECKPOINT_FILE, _checkpoint_state(model, optimizers, done, cfg))
            status.saved = done

        if on_eval is not None and cfg.eval_every and done % cfg.eval_every == 0:
            model.eval()
            eval_metrics = on_eval(done, model)
            model.train()
            if eval_metrics:
                recorder.log_metrics(eval_metrics, step=done)

    bar.close()
    final_iteration = max(start, cfg.iters)
    save_grids(model, display_a, display_b, run_dir, final_iteration, recorder)
    save_checkpoint(run_dir / CHECKPOINT_FILE, _checkpoint_state(model, optimizers, final_iteration, cfg))
    status.saved = final_iteration
    model.eval()
    return TrainResult(model=model, iterations=final_iteration, metrics=metrics, run_dir=run_dir, start=start)
