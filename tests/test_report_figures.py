"""The report's examples picture shows the best and worst test images whole, at a whole-number zoom."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mbu.data.images import AnnotatedImages
from mbu.evaluate.report import EXAMPLE_PANEL_PIXELS, EXAMPLES_PER_SIDE, plot_examples
from mbu.evaluate.segmentation import ModelMaps, score_masks
from PIL import Image


@pytest.mark.parametrize("side", [64, 128])
def test_examples_show_each_ranked_image_and_soft_mask_uncropped(tmp_path: Path, side: int) -> None:
    # Ten images of one colour each, whose soft masks are one grey each: a colour's pixel count on the
    # page is how many panels show that image times the panel's area.
    n = 10
    colours = torch.tensor([[20 * i + 10, 200 - 15 * i, 7 * i + 3] for i in range(n)], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(n, 3, side, side).contiguous()
    truth = torch.zeros(n, side, side, dtype=torch.bool)
    truth[:, side // 4 : side // 2, side // 4 : 3 * side // 4] = True
    greys = [60 + 12 * i for i in range(n)]  # soft-mask values that are whole grey levels: no rounding doubt
    levels = torch.tensor(greys, dtype=torch.float32) / 255
    masks = levels[:, None, None].expand(n, side, side).contiguous()
    names = [f"{i:06d}.png" for i in range(n)]
    scores = score_masks(masks, truth, names)
    path = tmp_path / "examples.png"
    plot_examples(path, scores, ModelMaps(masks, masks), AnnotatedImages(images, truth, names))

    page = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    area = (side * math.ceil(EXAMPLE_PANEL_PIXELS / side)) ** 2
    ranked = [name for _, name in sorted(zip(scores.test_image_iou, scores.test_names, strict=True), reverse=True)]
    k = min(EXAMPLES_PER_SIDE, len(ranked))
    shown = ranked[:k] + ranked[::-1][:k]
    for i, name in enumerate(names):
        panels = shown.count(name)
        colour_pixels = int((page == colours[i].numpy()).all(axis=1).sum())
        grey_pixels = int((page == greys[i]).all(axis=1).sum())
        assert colour_pixels == panels * area, (name, colour_pixels, panels)
        assert grey_pixels >= panels * area, (name, grey_pixels, panels)
