"""The optimisation step and what it needs: device, model, optimizers, loss functions.

Kept apart from the loop (which logs to MLflow and writes checkpoints) so that the
step can be timed and run anywhere torch runs (``bench/train_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbu.base.command import TrainingDiverged
from mbu.train.config import TrainConfig
from mbu.train.losses import LossWeights, autoencoder_losses, discriminator_loss
from mbu.train.model import ContentTransferModel

# The reference clips the autoencoder's gradient norm to 5. It means to clip the
# discriminator's too, but hands clip_grad_norm_ an already exhausted parameter
# generator, so its published models were trained with no discriminator clip:
# that is the default here (``disc_clip = 0``), the intended clip an option.
GRAD_CLIP = 5.0
ADAM_BETAS = (0.5, 0.999)


def place_dataset(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 data set on ``device``, or left in host memory when the device cannot hold it."""
    try:
        return images.to(device)
    except torch.OutOfMemoryError:
        return images.pin_memory()  # batches are then gathered on the host and copied over


class NonFiniteLossError(TrainingDiverged):
    """The loss became NaN or infinite; the message names the iteration."""


class DeviceError(ValueError):
    """A device that does not exist here or cannot be named so."""


def parse_device(device: str) -> torch.device | None:
    """``device`` as a torch device (None for ``auto``), not yet checked to exist on this machine.

    A name that is no device this runs on (``tpu``, ``meta``) is a :class:`DeviceError`.
    """
    if device == "auto":
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """``--gpu N`` wins; ``auto`` means CUDA when present, else CPU. Checks the device exists here."""
    if gpu is not None:
        device = f"cuda:{gpu}"
    resolved = parse_device(device)
    if resolved is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was asked for but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def check_step_device(cfg: TrainConfig, device: torch.device, source: str = "--cuda-graph") -> None:
    """A captured step needs CUDA: say so before anything runs, naming where it was asked for (``source``)."""
    if cfg.cuda_graph and device.type != "cuda":
        raise DeviceError(
            f"{source} needs a CUDA device, and this run is on {device}: drop it, or run on a machine with CUDA"
        )


@dataclass
class Optimizers:
    autoencoder: torch.optim.Adam
    disc: torch.optim.Adam

    @classmethod
    def create(cls, model: ContentTransferModel, lr: float, disclr: float, capturable: bool = False) -> Optimizers:
        """Fused Adam (one kernel for all parameters, same update rule); ``capturable`` for a CUDA graph."""
        options = dict(betas=ADAM_BETAS, fused=True, capturable=capturable)
        return cls(
            torch.optim.Adam(model.autoencoder_parameters(), lr=lr, **options),
            torch.optim.Adam(model.disc.parameters(), lr=disclr, **options),
        )

    def state_dict(self) -> dict[str, dict]:
        return {"opt_autoencoder": self.autoencoder.state_dict(), "opt_disc": self.disc.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Load a checkpoint's optimizer states, whether written by a captured (CUDA graph) run or an eager one.

        A saved state carries its run's ``capturable`` option; this run keeps its own.
        """
        for optimizer, key in ((self.autoencoder, "opt_autoencoder"), (self.disc, "opt_disc")):
            capturable = [group["capturable"] for group in optimizer.param_groups]
            optimizer.load_state_dict(state[key])
            for group, value in zip(optimizer.param_groups, capturable, strict=True):
                group["capturable"] = value


@dataclass(frozen=True)
class LossFunctions:
    """The two loss computations, eager or compiled as one graph each."""

    autoencoder: Callable = autoencoder_losses
    disc: Callable = discriminator_loss

    @classmethod
    def create(cls, compile: bool) -> LossFunctions:
        # Whole functions, not modules: a compiled module called several times in one
        # graph breaks autograd on its in-place BatchNorm statistics.
        if not compile:
            return cls()
        return cls(torch.compile(autoencoder_losses), torch.compile(discriminator_loss))


def train_step(
    model: ContentTransferModel,
    optimizers: Optimizers,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: LossWeights,
    bf16: bool = False,
    losses: LossFunctions = LossFunctions(),
    disc_clip: float = 0.0,
    capturing: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One autoencoder update then one discriminator update; returns detached losses.

    ``bf16`` runs the forward passes under bfloat16 autocast (weights and optimizer stay float32).
    ``disc_clip`` > 0 clips the discriminator's gradient norm (0: no clip, as the reference ran).
    ``capturing``: recorded into a CUDA graph, where autocast must not cache casts across replays.
    """
    autocast = torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not capturing)
    # Autoencoder: the seven weighted terms.
    optimizers.autoencoder.zero_grad(set_to_none=True)
    with autocast:
        total, terms = losses.autoencoder(model, a, b, weights)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.autoencoder_parameters(), GRAD_CLIP)
    optimizers.autoencoder.step()

    # Discriminator: tell A's common codes from B's.
    optimizers.disc.zero_grad(set_to_none=True)
    with autocast:
        disc_loss = losses.disc(model, a, b)
    disc_loss.backward()
    if disc_clip:
        torch.nn.utils.clip_grad_norm_(model.disc.parameters(), disc_clip)
    optimizers.disc.step()
    return total.detach(), {k: v.detach() for k, v in terms.items()}, disc_loss.detach()


def build_model(cfg: TrainConfig, device: torch.device) -> ContentTransferModel:
    """The seeded model on ``device``, in the memory layout ``cfg`` asks for."""
    torch.manual_seed(cfg.seed)  # same seed, same initial weights on any device
    model = ContentTransferModel(cfg.model_config()).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def memory_layout(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format
