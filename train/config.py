"""The training configuration: the reference ``mask_train.py`` flags, typed and checked.

Each setting is declared once, here: its default, its help text, its ``mbu train`` flag and its
*effect*, from which every rule about it is derived (:func:`setting`):

- ``model``: shapes what the model learns (learning rates, batch, size, seed, loss weights ...).
  A resumed run takes it from its checkpoint, and a typed flag that contradicts the checkpoint is
  refused; a study fingerprints it, so a study file that changes it between launches is refused.
- ``length``: how long a run trains and where it is judged (``iters``, ``eval_every``). A resume
  takes a typed flag (training further is what a resume is for), else the checkpoint's; a study
  fingerprints it, since trials trained to other lengths, or judged at other iterations, are not
  comparable.
- ``run``: how a run executes and logs, not what it learns from the same data (logging intervals,
  memory layout, compilation, ``skip_bad``). A resume takes a typed flag, else the checkpoint's; a
  study may change it between launches.
- ``machine``: where the run goes and what it runs on (``out``, ``load``, ``device``, ``gpu``):
  always the flag's on a resume (a default included), free between a study's launches.

A setting declared with no flag (``eval_every``) is set by its caller, the search, and a resume
never takes it from a checkpoint. Settings a study sets itself for each trial (``study=False``) may
not appear in a study file's ``[train]`` table.
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from mbu.train.losses import LossWeights
from mbu.train.model import ModelConfig

Effect = Literal["model", "length", "run", "machine"]
EFFECTS: tuple[Effect, ...] = ("model", "length", "run", "machine")
AMP_MODES = ("none", "bf16")
# BatchNorm normalises each channel over the batch: with one image per domain the encoders' last block
# (1 x 1 at 64 px) holds a single value per channel, and training stops at its first step.
MIN_BATCH = 2
MIN_BATCH_REASON = (
    f"the batch must hold at least {MIN_BATCH} images per domain: BatchNorm normalises over the batch "
    "and cannot train on one image"
)
# The help groups of mbu train, in the order --help shows them.
GROUPS = (
    "data and output",
    "optimisation",
    "model",
    "loss weights (reference names; paper terms in each help)",
    "logging and checkpoints",
    "device",
)


def setting(
    default: Any,
    help: str,
    *,
    effect: Effect,
    group: str,
    flag: str | None = "",
    choices: tuple[str, ...] | None = None,
    study: bool = True,
    factory: Any = None,
) -> Any:
    """One training setting's declaration, a dataclass field.

    ``flag``: its ``mbu train`` spelling; "" is ``--<name>`` (the reference's spelling), None no flag.
    ``study``: whether a study file's ``[train]`` may set it. ``help`` is the flag's help text, to which
    ``--help`` adds the default.
    """
    if effect not in EFFECTS or group not in GROUPS:
        raise ValueError(f"setting: unknown effect {effect!r} or group {group!r}")
    metadata = {"help": help, "effect": effect, "group": group, "flag": flag, "choices": choices, "study": study}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    root: str = setting(
        "",
        "data root: trainA/ trainB/ testA/ testB/ folders or trainA.txt ... list files",
        effect="run",
        group="data and output",
        study=False,
    )
    out: str = setting(
        "out", "run folder for the checkpoint, config and grids", effect="machine", group="data and output", study=False
    )
    lr: float = setting(2e-4, "Adam learning rate of encoders and decoders", effect="model", group="optimisation")
    disclr: float = setting(2e-4, "Adam learning rate of the discriminator", effect="model", group="optimisation")
    bs: int = setting(32, "batch size per domain", effect="model", group="optimisation")
    iters: int = setting(150_000, "training iterations; stops exactly there", effect="length", group="optimisation")
    resize: int = setting(128, "image side, a multiple of 64 (paper: 64, 128, 256)", effect="model", group="model")
    sep: int = setting(25, "channels of the separate code", effect="model", group="model")
    weights: LossWeights = setting(
        None,
        "the seven loss weights, one flag each",
        effect="model",
        group="loss weights (reference names; paper terms in each help)",
        factory=LossWeights,
    )
    disc_clip: float = setting(
        0.0,
        "clip the discriminator's gradient norm to this value; 0 = no clip, which is what the reference code ran "
        "and its published figures came from (it meant to clip at 5, the autoencoder's clip)",
        effect="model",
        group="optimisation",
    )
    progress_iter: int = setting(
        100,
        "log mean losses to MLflow and check they are finite every N iterations",
        effect="run",
        group="logging and checkpoints",
    )
    display_iter: int = setting(
        5000, "save image grids every N iterations", effect="run", group="logging and checkpoints"
    )
    save_iter: int = setting(
        10_000, "write a checkpoint every N iterations", effect="run", group="logging and checkpoints"
    )
    load: str = setting(
        "", "resume from the checkpoint in this run folder", effect="machine", group="data and output", study=False
    )
    num_display: int = setting(12, "images per side of the image grids", effect="run", group="logging and checkpoints")
    gpu: int | None = setting(
        None, "CUDA device index to train on (overrides --device)", effect="machine", group="device", study=False
    )
    device: str = setting(
        "auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", effect="machine", group="device"
    )
    seed: int = setting(0, "seed of weight init and batch order", effect="model", group="optimisation")
    eval_every: int = setting(
        0,
        "call the evaluation callback every N iterations (0: never); set by a search, which scores trials there",
        effect="length",
        group="logging and checkpoints",
        flag=None,
    )
    amp: str = setting(
        "none",
        "bf16: forward passes under bfloat16 autocast; faster where bf16 matmul is (recent CPUs, GPUs), losses "
        "differ slightly from float32",
        effect="model",
        group="device",
        choices=AMP_MODES,
    )
    channels_last: bool = setting(False, "NHWC memory layout for the convolutions", effect="run", group="device")
    compile: bool = setting(
        False,
        "torch.compile the loss computations: minutes of compilation first, then faster steps on GPUs",
        effect="run",
        group="device",
    )
    cuda_graph: bool = setting(
        False,
        "CUDA only: capture the whole training step (both updates, clipping, BatchNorm statistics) as one CUDA "
        "graph after 3 eager iterations and replay it; same losses, far fewer kernel launches. Not with --compile",
        effect="run",
        group="device",
        flag="--cuda-graph",
    )
    skip_bad: bool = setting(
        False,
        "leave unreadable or truncated images out (listed on stderr and in OUT/skipped_images.txt) instead of "
        "stopping with an error naming the first one",
        effect="run",
        group="data and output",
        flag="--skip-bad",
    )

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


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the rules read it; a loss weight is its own setting, with the weights' effect."""

    name: str
    default: Any
    type: type  # int, float, str or bool (``int | None`` is int)
    help: str
    effect: Effect
    group: str
    flag: str | None  # the mbu train flag, None for none
    choices: tuple[str, ...] | None
    study: bool  # a study file's [train] may set it


def declared_settings(config_type: type[TrainConfig] = TrainConfig) -> list[Setting]:
    """Every setting of ``config_type`` in declaration order, the loss weights spelt out one by one."""
    hints = get_type_hints(config_type)
    found = []
    for f in fields(config_type):
        meta = f.metadata
        if f.name == "weights":
            found += [_weight_setting(weight, meta) for weight in fields(LossWeights)]
            continue
        flag = f"--{f.name}" if meta["flag"] == "" else meta["flag"]
        found.append(
            Setting(
                f.name,
                f.default,
                _plain_type(hints[f.name]),
                meta["help"],
                meta["effect"],
                meta["group"],
                flag,
                meta["choices"],
                meta["study"],
            )  # fmt: skip
        )
    return found


def _weight_setting(weight: Field, weights_meta: Any) -> Setting:
    help_ = f"weight of {weight.metadata['paper_term']}: {weight.metadata['help']}"
    return Setting(
        weight.name, weight.default, float, help_, weights_meta["effect"], weights_meta["group"], f"--{weight.name}",
        None, weights_meta["study"],
    )  # fmt: skip


def _plain_type(hint: Any) -> type:
    """``int | None`` -> int; a plain type as it is."""
    options = [t for t in get_args(hint) if t is not type(None)]
    return options[0] if options else hint


def settings_of(*effects: Effect, config_type: type[TrainConfig] = TrainConfig) -> tuple[str, ...]:
    """The names of the settings with one of ``effects``."""
    return tuple(s.name for s in declared_settings(config_type) if s.effect in effects)


def study_train_keys(config_type: type[TrainConfig] = TrainConfig) -> set[str]:
    """What a study file's ``[train]`` table may set."""
    return {s.name for s in declared_settings(config_type) if s.study}


def free_between_launches(config_type: type[TrainConfig] = TrainConfig) -> set[str]:
    """``[train]`` keys a study may change between launches: they change how trials run, not what they learn."""
    return set(settings_of("run", "machine", config_type=config_type))
