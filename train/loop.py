"""One training loop: the reference's alternating autoencoder / discriminator updates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mbu.base.files import write_json
from mbu.base.run_files import CHECKPOINT_FILE, CONFIG_FILE, GRIDS_DIR, SKIPPED_FILE
from mbu.data.batches import DomainBatches
from mbu.data.images import load_display_images, load_domain, to_model_range
from mbu.train.checkpoint import check_architecture, check_resumable, load_checkpoint, save_checkpoint
from mbu.train.config import TrainConfig
from mbu.train.graph import make_step
from mbu.train.model import MODEL_VERSION, ContentTransferModel
from mbu.train.step import (
    NonFiniteLossError,
    Optimizers,
    build_model,
    check_step_device,
    memory_layout,
    place_dataset,
    resolve_device,
)
from mbu.train.tracking import Recorder
from mbu.train.visuals import training_grids

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


def record_skipped(skipped: list[str], run_dir: Path, recorder: Recorder) -> None:
    """With ``skip_bad``, list the files left out in ``run_dir/skipped_images.txt`` (and in MLflow)."""
    if not skipped:
        return
    path = run_dir / SKIPPED_FILE
    path.write_text("\n".join(skipped) + "\n")
    recorder.log_artifact(path)
    recorder.set_tags({"skipped_images": len(skipped)})


def _checkpoint_state(model: ContentTransferModel, optimizers: Optimizers, iteration: int, cfg: TrainConfig) -> dict:
    return {
        "model": model.state_dict(),
        **optimizers.state_dict(),
        "iteration": iteration,
        "model_version": MODEL_VERSION,
        "config": cfg.to_dict(),
        # Batches and flips depend only on (seed, iteration); the global RNG is saved for
        # anything random added later, and restored on resume.
        "rng_cpu": torch.get_rng_state(),
    }


@dataclass
class TrainingData:
    """What a training reads: both domains on the device, their batches' source, the display images.

    Loaded once and shared by every training of a population (same root, size and device).
    """

    train_a: torch.Tensor  # uint8 (N, 3, S, S), on the device when it fits there
    train_b: torch.Tensor
    display_a: torch.Tensor  # float in [-1, 1] on the device, for the image grids
    display_b: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # files left out with skip_bad

    @classmethod
    def load(cls, cfg: TrainConfig, device: torch.device, progress: bool) -> TrainingData:
        root = Path(cfg.root)
        domains = [load_domain(root, name, cfg.resize, progress, cfg.skip_bad) for name in ("trainA", "trainB")]
        train_a, train_b = (place_dataset(domain.images, device) for domain in domains)
        display = load_display_images(root, cfg.resize, cfg.num_display, cfg.skip_bad)
        display_a, display_b = (to_model_range(x.to(device)) for x in display)
        return cls(train_a, train_b, display_a, display_b, [line for d in domains for line in d.skipped])


def data_key(cfg: TrainConfig) -> tuple:
    """Trainings whose configs agree on this read the same :class:`TrainingData`."""
    return (str(Path(cfg.root).resolve()), cfg.resize, cfg.num_display, cfg.skip_bad, cfg.device, cfg.gpu)


class Training:
    """One training run, advanced an iteration at a time by :meth:`step` (see :func:`train`).

    A population interleaves the steps of several trainings in one process;
    each keeps its own model, optimizers, batches (a function of its seed and
    iteration), checkpoint and MLflow run, so a training stepped among others
    computes exactly what it computes alone.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        on_eval: EvalCallback | None = None,
        progress: bool = True,
        status: TrainStatus | None = None,
        recorder: Recorder | None = None,
        data: TrainingData | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_eval = on_eval
        self.status = status if status is not None else TrainStatus()
        self.recorder = recorder if recorder is not None else Recorder.off()
        self.device = resolve_device(cfg.device, cfg.gpu)
        check_step_device(cfg, self.device)
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / CONFIG_FILE, cfg.to_dict())

        # Data: decoded once, kept as uint8 on the training device when it fits there.
        self.data = data if data is not None else TrainingData.load(cfg, self.device, progress)
        record_skipped(self.data.skipped, self.run_dir, self.recorder)
        self.batches_a = DomainBatches(self.data.train_a, cfg.bs, cfg.seed, domain=0, device=self.device)
        self.batches_b = DomainBatches(self.data.train_b, cfg.bs, cfg.seed, domain=1, device=self.device)

        # Model and optimizers, fresh or resumed.
        self.model = build_model(cfg, self.device)
        self.optimizers = Optimizers.create(self.model, cfg.lr, cfg.disclr, capturable=cfg.cuda_graph)
        self.start = 0
        if cfg.load:
            self._resume(Path(cfg.load))
        self.iteration = self.start
        self.layout = memory_layout(cfg)
        self.step_fn = make_step(self.model, self.optimizers, cfg)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.metrics: dict[str, float] = {}
        self.model.train()
        self.bar = tqdm(
            total=cfg.iters, initial=self.start, desc="train", disable=not progress, unit="it", dynamic_ncols=True
        )

    def _resume(self, load: Path) -> None:
        state = load_checkpoint(load, map_location=self.device)
        check_architecture(state, self.cfg.resize, self.cfg.sep, load)
        check_resumable(state, load)
        self.model.load_state_dict(state["model"])
        self.optimizers.load_state_dict(state)
        self.start = int(state["iteration"])
        self.status.iteration = self.start
        if load.resolve() == self.run_dir.resolve():
            self.status.saved = self.start  # resuming in place: that checkpoint is this run's last one
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"].cpu())

    @property
    def done(self) -> bool:
        return self.iteration >= self.cfg.iters

    def iterations_to_next_log(self) -> int:
        """Iterations left until the next loss log (or the end): a natural chunk to run without switching."""
        cfg = self.cfg
        return min(cfg.progress_iter - self.iteration % cfg.progress_iter, cfg.iters - self.iteration)

    def step(self) -> None:
        """One iteration, then whatever falls due at it: loss log and finite check, grids, checkpoint, eval.

        Raises :class:`NonFiniteLossError` at the first loss log after the loss became NaN or infinite;
        whatever ``on_eval`` raises (e.g. ``optuna.TrialPruned``) passes through.
        """
        cfg = self.cfg
        a = self.batches_a.batch(self.iteration).contiguous(memory_format=self.layout)
        b = self.batches_b.batch(self.iteration).contiguous(memory_format=self.layout)
        total, terms, disc_loss = self.step_fn(a, b)
        # Sums stay on the device: no host sync until the interval ends.
        for name, value in {
            "loss_total": total,
            "loss_disc": disc_loss,
            **{f"loss_{k}": v for k, v in terms.items()},
        }.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1
        done = self.iteration = self.status.iteration = self.iteration + 1
        self.bar.update(1)

        if done % cfg.progress_iter == 0 or done == cfg.iters:
            self.metrics = {f"train/{k}": v.item() / self.count for k, v in self.sums.items()}
            self.sums, self.count = {}, 0
            if not all(math.isfinite(self.metrics[f"train/{k}"]) for k in ("loss_total", "loss_disc")):
                raise NonFiniteLossError(f"non-finite loss at iteration {done}")
            self.recorder.log_metrics(self.metrics, step=done)
            self.bar.set_postfix(loss=f"{self.metrics['train/loss_total']:.4f}")

        if done % cfg.display_iter == 0 and done != cfg.iters:
            save_grids(self.model, self.data.display_a, self.data.display_b, self.run_dir, done, self.recorder)

        if done % cfg.save_iter == 0 and done != cfg.iters:
            self.save()

        if self.on_eval is not None and cfg.eval_every and done % cfg.eval_every == 0:
            self.model.eval()
            eval_metrics = self.on_eval(done, self.model)
            self.model.train()
            if eval_metrics:
                self.recorder.log_metrics(eval_metrics, step=done)

    def save(self) -> None:
        """Write the checkpoint at the current iteration (also what a stopped training calls)."""
        if self.status.saved == self.iteration and (self.run_dir / CHECKPOINT_FILE).is_file():
            return
        state = _checkpoint_state(self.model, self.optimizers, self.iteration, self.cfg)
        save_checkpoint(self.run_dir / CHECKPOINT_FILE, state)
        self.status.saved = self.iteration

    def close(self) -> None:
        self.bar.close()

    def finish(self) -> TrainResult:
        """Final grids and checkpoint at the iteration reached (``iters``, or earlier for a run ended early)."""
        self.close()
        final_iteration = self.iteration
        save_grids(self.model, self.data.display_a, self.data.display_b, self.run_dir, final_iteration, self.recorder)
        self.iteration = final_iteration
        self.save()
        self.model.eval()
        return TrainResult(self.model, final_iteration, self.metrics, self.run_dir, self.start)


class TrainingStopped(Exception):
    """Training stopped between iterations because a stop was asked; the checkpoint is at ``iteration``."""

    def __init__(self, reason: str, iteration: int, saved: bool) -> None:
        super().__init__(f"stopped by {reason} at iteration {iteration}")
        self.reason = reason
        self.iteration = iteration
        self.saved = saved  # False when it stopped before its first iteration (nothing new to keep)


def train(
    cfg: TrainConfig,
    on_eval: EvalCallback | None = None,
    progress: bool = True,
    status: TrainStatus | None = None,
    recorder: Recorder | None = None,
    stop: Callable[[], str | None] | None = None,
) -> TrainResult:
    """Train on ``cfg.root`` into ``cfg.out``; losses, grids and eval metrics go to ``recorder``'s run.

    Checkpoints go to ``out/checkpoint.pt`` every ``save_iter`` iterations and at
    the end. With ``cfg.load`` set, training resumes from that folder's
    checkpoint and continues exactly where it stopped (batches depend only on
    the seed and the iteration). Raises :class:`NonFiniteLossError` within one
    ``progress_iter`` interval of the loss becoming NaN or infinite. ``status``,
    when given, follows the iteration and the last checkpoint written. ``stop``
    is asked before each iteration; once it gives a reason, the training writes
    its checkpoint and raises :class:`TrainingStopped`.
    """
    training = Training(cfg, on_eval, progress, status, recorder)
    try:
        while not training.done:
            reason = stop() if stop is not None else None
            if reason is not None:
                moved = training.iteration > training.start
                if moved:
                    training.save()
                raise TrainingStopped(reason, training.iteration, moved)
            training.step()
    finally:
        training.close()
    return training.finish()
