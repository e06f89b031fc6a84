"""The report's examples picture shows the best and worst test images whole, upright, at a whole-number zoom."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbu.data.images import AnnotatedImages
from mbu.evaluate.report import EXAMPLE_PANEL_PIXELS, EXAMPLES_PER_SIDE, plot_examples
from mbu.evaluate.segmentation import ModelMaps, score_masks


def where(page: np.ndarray, colour: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the page's pixels of exactly this colour (an int: that grey)."""
    return np.nonzero((page == colour).all(axis=2))


@pytest.mark.parametrize("side", [64, 128])
def test_examples_show_each_ranked_image_and_soft_mask_uncropped_and_upright(tmp_path: Path, side: int) -> None:
    # Ten images, each with a top half and a bottom half of its own colours, whose soft masks are one
    # grey each: a colour's pixel count on the page is how many panels show that image times the area.
    n = 10
    tops = torch.tensor([[20 * i + 10, 200 - 15 * i, 7 * i + 3] for i in range(n)], dtype=torch.uint8)
    bottoms = 255 - tops
    images = torch.empty(n, 3, side, side, dtype=torch.uint8)
    images[:, :, : side // 2] = tops[:, :, None, None]
    images[:, :, side // 2 :] = bottoms[:, :, None, None]
    truth = torch.zeros(n, side, side, dtype=torch.bool)
    truth[:, side // 4 : side // 2, side // 4 : 3 * side // 4] = True
    greys = [60 + 12 * i for i in range(n)]  # soft-mask values that are whole grey levels: no rounding doubt
    masks = (torch.tensor(greys, dtype=torch.float32) / 255)[:, None, None].expand(n, side, side).contiguous()
    names = [f"{i:06d}.png" for i in range(n)]
    scores = score_masks(masks, truth, names)
    path = tmp_path / "examples.png"
    plot_examples(path, scores, ModelMaps(masks, masks), AnnotatedImages(images, truth, names))

    page = np.asarray(Image.open(path).convert("RGB"))
    area = (side * math.ceil(EXAMPLE_PANEL_PIXELS / side)) ** 2
    ranked = [name for _, name in sorted(zip(scores.test_image_iou, scores.test_names, strict=True), reverse=True)]
    k = min(EXAMPLES_PER_SIDE, len(ranked))
    shown = ranked[:k] + ranked[::-1][:k]
    for i, name in enumerate(names):
        panels = shown.count(name)
        assert len(where(page, tops[i].numpy())[0]) == panels * area // 2, (name, panels)
        assert len(where(page, bottoms[i].numpy())[0]) == panels * area // 2, (name, panels)
        assert len(where(page, greys[i])[0]) >= panels * area, (name, panels)

    # The best image is the first row's, upright, in the first column, with its soft mask to its right.
    best = names.index(ranked[0])
    top_rows, top_columns = where(page, tops[best].numpy())
    bottom_rows, _ = where(page, bottoms[best].numpy())
    assert top_rows.min() < bottom_rows.min()
    others = [where(page, tops[i].numpy())[0] for i in range(n) if i != best and names[i] in shown]
    assert all(top_rows.min() < rows.min() for rows in others)
    panel_rows = page[top_rows.min() : bottom_rows.max() + 1]  # that row of panels, without the captions
    assert where(panel_rows, greys[best])[1].min() > top_columns.max()
