"""The five networks of mask-based content transfer, layer for layer as the reference code builds them.

Naming follows the reference: domain A holds the extra content, B lacks it.
A latent code is the flattened common code concatenated with the flattened
separate code, viewed as ``512 x s x s`` with ``s = resize // 64``.

Every block is [4x4 conv (transposed in the decoders), stride 2, padding 1;
BatchNorm2d; LeakyReLU(0.2)], with PyTorch's default initialisation and
BatchNorm settings (the reference sets none of its own):

- ``e_common`` (reference ``e1``): 6 blocks, 3→32→64→128→256→(512−sep)→(512−sep).
- ``e_separate`` (``e2``): 6 blocks, 3→32→64→128→128→128→sep.
- ``decoder`` (``d_a``): 5 transposed blocks 512→512→256→128→64→32, then a
  transposed conv 32→3 and tanh.
- ``mask_decoder`` (``d_b``): the same 5 blocks, then a transposed conv 32→4;
  mask = sigmoid(channel 0), content = tanh(channels 1..3), output =
  mask·content + (1−mask)·background.
- ``disc``: Linear((512−sep)·s², 512), LeakyReLU(0.2), Linear(512, 1), sigmoid.

``tests/test_network_layers.py`` states this table independently and checks the
built model against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LATENT_CHANNELS = 512
RESIZE_STEP = 64  # six stride-2 blocks halve the side six times
LEAKY_SLOPE = 0.2  # negative slope of every hidden activation, encoders, decoders and discriminator alike
# Written into every checkpoint. 1: decoders with ReLU (mbu 0.1, not the paper's model);
# 2: LeakyReLU(0.2) decoders, as the reference. Checkpoints of another version are refused.
MODEL_VERSION = 2


@dataclass(frozen=True)
class ModelConfig:
    resize: int = 128  # image side in pixels; a multiple of 64
    sep: int = 25  # channels of the separate (content) code; common gets 512 - sep

    def __post_init__(self) -> None:
        if not isinstance(self.resize, int) or self.resize < RESIZE_STEP or self.resize % RESIZE_STEP:
            raise ValueError(
                f"resize must be a multiple of {RESIZE_STEP} (six stride-2 blocks halve it six times), "
                f"got {self.resize}"
            )
        if not 0 < self.sep < LATENT_CHANNELS:
            raise ValueError(f"sep must be in 1..{LATENT_CHANNELS - 1}, got {self.sep}")

    @property
    def latent_side(self) -> int:
        return self.resize // 64

    @property
    def common_dim(self) -> int:
        return (LATENT_CHANNELS - self.sep) * self.latent_side**2

    @property
    def separate_dim(self) -> int:
        return self.sep * self.latent_side**2


# On CPU in float32, oneDNN's convolutions are slow on the wide layers next to the
# latent (>= 256 channels in and out on <= 16 positions: ~70 GFLOP/s on this project's 2-core
# AVX-512 machine), where one matrix multiply over the unfolded patches takes about half
# the time (bench/conv_layers.py; the whole step gains 8-32 %, bench/train_step.py).
MATMUL_MAX_POSITIONS = 16
MATMUL_MIN_CHANNELS = 256


def uses_matmul_form(layer: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor) -> bool:
    """Whether ``layer`` runs on ``x`` faster as one matrix multiply (CPU, float32, few wide positions)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # bf16 autocast: oneDNN's AMX kernels are fast everywhere
        and x.shape[-2] * x.shape[-1] <= MATMUL_MAX_POSITIONS
        and min(layer.in_channels, layer.out_channels) >= MATMUL_MIN_CHANNELS
    )


class DownConv(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) with the CPU kernel chosen per layer.

    ``cpu_tuning = False`` runs the stock kernels (the reference's, for the benchmark).
    """

    cpu_tuning = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_tuning and uses_matmul_form(self, x):
            return conv_by_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)


class UpConv(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with the CPU kernel chosen per layer (see :class:`DownConv`)."""

    cpu_tuning = True

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.cpu_tuning and output_size is None and uses_matmul_form(self, x):
            return conv_transpose_by_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x, output_size)


def conv_by_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """``F.conv2d`` as one matrix multiply of the unfolded patches (N·positions x C·k·k)."""
    n, _, h, w = x.shape
    c_out, _, k, _ = weight.shape
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    patches = F.unfold(x, k, padding=padding, stride=stride)  # (N, C*k*k, positions)
    rows = patches.transpose(1, 2).reshape(n * h_out * w_out, -1)
    out = torch.addmm(bias, rows, weight.reshape(c_out, -1).t())  # (N*positions, C_out)
    return out.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)


def conv_transpose_by_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """``F.conv_transpose2d`` as one matrix multiply, its patches summed into place by ``fold``."""
    n, c_in, h, w = x.shape
    k = weight.shape[-1]
    size = ((h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k)
    patches = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in) @ weight.reshape(c_in, -1)
    patches = patches.view(n, h * w, -1).transpose(1, 2)  # (N, C_out*k*k, positions)
    return F.fold(patches, size, k, padding=padding, stride=stride) + bias.view(1, -1, 1, 1)


def use_stock_kernels(model: nn.Module) -> None:
    """Run every convolution on PyTorch's default kernels, as the reference code did."""
    for layer in model.modules():
        if isinstance(layer, DownConv | UpConv):
            layer.cpu_tuning = False


def _down_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [DownConv(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]


def _up_block(c_in: int, c_out: int) -> list[nn.Module]:
    # LeakyReLU like the encoders, as the reference's decoders (ReLU here lost ~0.16 IoU on real faces).
    return [UpConv(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]


class Encoder(nn.Module):
    """Six stride-2 conv blocks; returns the code flattened to (N, channels * s * s)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += _down_block(c_in, c_out)
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).flatten(1)  # (N, 3, H, W) -> (N, C * s * s)


def common_encoder(cfg: ModelConfig) -> Encoder:
    """Reference ``e1``: 3→32→64→128→256→(512−sep)→(512−sep)."""
    rest = LATENT_CHANNELS - cfg.sep
    return Encoder([3, 32, 64, 128, 256, rest, rest])


def separate_encoder(cfg: ModelConfig) -> Encoder:
    """Reference ``e2``: 3→32→64→128→128→128→sep."""
    return Encoder([3, 32, 64, 128, 128, 128, cfg.sep])


class _Trunk(nn.Module):
    """Six transposed-conv blocks from a 512 x s x s code to an image-sized map."""

    def __init__(self, cfg: ModelConfig, out_channels: int) -> None:
        super().__init__()
        self.side = cfg.latent_side
        layers: list[nn.Module] = []
        for c_in, c_out in [(512, 512), (512, 256), (256, 128), (128, 64), (64, 32)]:
            layers += _up_block(c_in, c_out)
        layers.append(UpConv(32, out_channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code.view(-1, LATENT_CHANNELS, self.side, self.side))


class Decoder(nn.Module):
    """Reference ``d_a``: code → image in [-1, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.trunk = _Trunk(cfg, 3)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.trunk(code))


class MaskDecoder(nn.Module):
    """Reference ``d_b``: code → (mask, content image); composited over a background.

    The trunk depends only on the code, so callers that need several backgrounds
    for one code call :meth:`layers` once and :func:`composite` per background.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.trunk = _Trunk(cfg, 4)

    def layers(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.trunk(code)  # (N, 4, H, W)
        mask = torch.sigmoid(raw[:, :1])  # (N, 1, H, W) in [0, 1]
        content = torch.tanh(raw[:, 1:])  # (N, 3, H, W) in [-1, 1]
        return mask, content

    def forward(self, code: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, content = self.layers(code)
        return composite(mask, content, background), mask


def composite(mask: torch.Tensor, content: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """m·z + (1−m)·background."""
    return mask * content + (1 - mask) * background


class Discriminator(nn.Module):
    """Reference ``disc``: MLP on the flattened common code, probability of domain A."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.common_dim, 512),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Linear(512, 1),
            nn.Sigmoid(),
        )

    def forward(self, common: torch.Tensor) -> torch.Tensor:
        return self.net(common)


class ContentTransferModel(nn.Module):
    """The five networks together, so one ``state_dict`` and one ``.to()`` cover them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.e_common = common_encoder(cfg)
        self.e_separate = separate_encoder(cfg)
        self.decoder = Decoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.disc = Discriminator(cfg)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Everything the autoencoder optimizer updates (all but the discriminator)."""
        modules = [self.e_common, self.e_separate, self.decoder, self.mask_decoder]
        return [p for m in modules for p in m.parameters()]

    def zero_separate(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.cfg.separate_dim)

    @staticmethod
    def code(common: torch.Tensor, separate: torch.Tensor) -> torch.Tensor:
        return torch.cat([common, separate], dim=1)

    # Uses of a trained model: transfer, removal and segmentation (docs/commands.md).

    @torch.no_grad()
    def segment(self, images_a: torch.Tensor) -> torch.Tensor:
        """Soft mask of the content in A images, (N, 1, H, W) in [0, 1]."""
        code = self.code(self.e_common(images_a), self.e_separate(images_a))
        mask, _ = self.mask_decoder.layers(code)
        return mask

    @torch.no_grad()
    def content_free(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder reconstruction with a zero separate code."""
        common = self.e_common(images)
        return self.decoder(self.code(common, self.zero_separate(len(images), common)))

    @torch.no_grad()
    def transfer(self, guides_a: torch.Tensor, targets_b: torch.Tensor) -> torch.Tensor:
        """Content of each guide onto the target of the same index."""
        code = self.code(self.e_common(targets_b), self.e_separate(guides_a))
        out, _ = self.mask_decoder(code, targets_b)
        return out

    @torch.no_grad()
    def remove(self, images: torch.Tensor, threshold: float, soft_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the masked content with the content-free reconstruction.

        ``soft_mask`` is :meth:`segment`'s output for ``images`` where the caller has it already.
        """
        soft_mask = self.segment(images) if soft_mask is None else soft_mask
        mask = (soft_mask >= threshold).to(images.dtype)
        return mask * self.content_free(images) + (1 - mask) * images
