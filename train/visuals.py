"""The image grids shown during training, as uint8 (H, W, 3) arrays.

Images are shown as they are (mapped from [-1, 1]); masks are shown in
[0, 1] as they are, never min-max normalised with the images.
"""

from __future__ import annotations

import numpy as np
import torch

from mbu.data.images import to_uint8
from mbu.train.model import ContentTransferModel

DISPLAY_THRESHOLD = 0.5  # removal threshold used in the training-time removal grid
OVERLAY_COLOR = torch.tensor([255.0, 0.0, 0.0])  # segmentation overlay tint
PAD = 2


def _to_array(grid: torch.Tensor) -> np.ndarray:
    return grid.permute(1, 2, 0).cpu().numpy()


def _mask_rgb(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] → (N, 3, H, W) uint8 grey."""
    return (mask.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)


def _rows(rows: list[torch.Tensor]) -> np.ndarray:
    """Stack equal-length rows of uint8 images into one grid."""
    # Imported here: torchvision's package import pulls in torch._dynamo (~2 s per process), and most
    # processes (launchers, --summary, apply commands, training between grids) never draw one.
    from torchvision.utils import make_grid

    return _to_array(make_grid(torch.cat(rows), nrow=len(rows[0]), padding=PAD, pad_value=255))


@torch.no_grad()
def transfer_grids(
    model: ContentTransferModel, guides_a: torch.Tensor, targets_b: torch.Tensor
) -> dict[str, np.ndarray]:
    """Guide A rows × target B columns: the transfers, and each transfer's own mask.

    The first row holds the targets and the first column the guides; the corner is blank.
    """
    n_g, n_t = len(guides_a), len(targets_b)
    guides = guides_a.repeat_interleave(n_t, 0)  # row-major over (guide, target)
    targets = targets_b.repeat(n_g, 1, 1, 1)
    code = model.code(model.e_common(targets), model.e_separate(guides))
    mask, content = model.mask_decoder.layers(code)
    out = mask * content + (1 - mask) * targets
    blank = torch.full_like(to_uint8(targets_b[:1]), 255)

    def framed(cells: torch.Tensor) -> np.ndarray:
        rows = [torch.cat([blank, to_uint8(targets_b)])]
        for i in range(n_g):
            rows.append(torch.cat([to_uint8(guides_a[i : i + 1]), cells[i * n_t : (i + 1) * n_t]]))
        return _rows(rows)

    return {"transfer": framed(to_uint8(out)), "transfer_masks": framed(_mask_rgb(mask))}


@torch.no_grad()
def domain_grids(model: ContentTransferModel, images_a: torch.Tensor, images_b: torch.Tensor) -> dict[str, np.ndarray]:
    """Segmentation overlay, content-free reconstructions and removal, one column per image."""
    mask = model.segment(images_a)  # (N, 1, H, W)
    a_u8 = to_uint8(images_a)
    overlay = (a_u8.float() * (1 - 0.6 * mask) + 0.6 * mask * OVERLAY_COLOR.view(1, 3, 1, 1).to(mask.device)).round()
    return {
        "segmentation": _rows([a_u8, _mask_rgb(mask), overlay.to(torch.uint8)]),
        "reconstruction": _rows(
            [
                a_u8,
                to_uint8(model.content_free(images_a)),
                to_uint8(images_b),
                to_uint8(model.content_free(images_b)),
            ]
        ),
        "removal": _rows([a_u8, to_uint8(model.remove(images_a, DISPLAY_THRESHOLD))]),
    }


def training_grids(
    model: ContentTransferModel, images_a: torch.Tensor, images_b: torch.Tensor
) -> dict[str, np.ndarray]:
    """Every grid, computed in eval mode (the caller restores the mode)."""
    model.eval()
    return {**transfer_grids(model, images_a, images_b), **domain_grids(model, images_a, images_b)}
