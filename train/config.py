"""The training configuration: the reference ``mask_train.py`` flags, typed and checked."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mbu.train.losses import LossWeights
from mbu.train.model import ModelConfig

AMP_MODES = ("none", "bf16")
# BatchNorm normalises each channel over the batch: with one image per domain the encoders' last block
# (1 x 1 at 64 px) holds a single value per channel, and training stops at its first step.
MIN_BATCH = 2
MIN_BATCH_REASON = (
    f"the batch must hold at least {MIN_BATCH} images per domain: BatchNorm normalises over the batch "
    "and cannot train on one image"
)


@dataclass
class TrainConfig:
    root: str = ""  # data root: trainA/ trainB/ (testA/ testB/ testA_masks/) folders or list files
    out: str = "out"  # run folder: checkpoint, config, grids, report
    lr: float = 2e-4  # Adam learning rate of the encoders and decoders
    disclr: float = 2e-4  # Adam learning rate of the domain discriminator
    bs: int = 32  # batch size, per domain
    iters: int = 150_000  # training iterations (one batch of A and one of B each)
    resize: int = 128  # image side in pixels: a multiple of 64 (64, 128, 256 in the paper)
    sep: int = 25  # channels of the separate code
    weights: LossWeights = field(default_factory=LossWeights)  # the seven loss weights
    disc_clip: float = 0.0  # discriminator gradient-norm clip; 0 = none, what the reference's code ran (it meant 5)
    progress_iter: int = 100  # log losses (and check they are finite) every N iterations
    display_iter: int = 5000  # save image grids every N iterations
    save_iter: int = 10_000  # write a checkpoint every N iterations
    load: str = ""  # resume from this run folder's checkpoint
    num_display: int = 12  # images per grid side
    gpu: int | None = None  # CUDA device index (reference flag); overrides device
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda, cuda:N
    seed: int = 0  # model initialisation and batch order
    eval_every: int = 0  # call the evaluation callback every N iterations (0: never)
    amp: str = "none"  # "bf16": autocast forward passes to bfloat16 (faster on recent hardware: docs/performance.md)
    channels_last: bool = False  # NHWC memory layout for convolutions
    compile: bool = False  # torch.compile the loss computations (long first iteration)
    cuda_graph: bool = False  # CUDA only: capture the whole step as one CUDA graph and replay it
    skip_bad: bool = False  # leave unreadable images out (listed in skipped_images.txt) instead of stopping

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        self.model_config()  # validates resize and sep
        for name in ("lr", "disclr"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("bs", "iters", "progress_iter", "display_iter", "save_iter", "num_display"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.disc_clip >= 0 and math.isfinite(self.disc_clip)):
            raise ValueError(f"disc_clip must be a finite number >= 0 (0: no clip), got {self.disc_clip}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph and compile cannot be combined: choose one (compile has its own graphs)")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")

    def model_config(self) -> ModelConfig:
        return ModelConfig(resize=self.resize, sep=self.sep)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**values)


WEIGHT_NAMES = tuple(f.name for f in fields(LossWeights))
