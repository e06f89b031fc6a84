from __future__ import annotations

import pytest
import torch

from train.model import ContentTransferModel, ModelConfig, composite


@pytest.mark.parametrize("resize", [64, 128])
def test_shapes_and_mask_range(resize: int) -> None:
    cfg = ModelConfig(resize=resize, sep=25)
    model = ContentTransferModel(cfg)
    x = torch.rand(2, 3, resize, resize) * 2 - 1
    common, separate = model.e_common(x), model.e_separate(x)
    side = resize // 64
    assert common.shape == (2, (512 - 25) * side * side)
    assert separate.shape == (2, 25 * side * side)
    code = model.code(common, separate)
    assert model.decoder(code).shape == (2, 3, resize, resize)
    out, mask = model.mask_decoder(code, x)
    assert out.shape == (2, 3, resize, resize)
    assert mask.shape == (2, 1, resize, resize)
    assert mask.min() >= 0 and mask.max() <= 1
    assert model.disc(common).shape == (2, 1)
    assert model.segment(x).shape == (2, 1, resize, resize)


def test_composite_is_background_where_mask_is_zero() -> None:
    model = ContentTransferModel(ModelConfig(resize=64))
    last = model.mask_decoder.trunk.net[-1]
    with torch.no_grad():
        last.bias[0] = -1e4  # mask channel saturates to exactly 0 everywhere
    x, background = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    code = model.code(model.e_common(x), model.e_separate(x))
    out, mask = model.mask_decoder(code, background)
    assert torch.all(mask == 0)
    assert torch.equal(out, background)


def test_composite_blends_by_mask() -> None:
    mask = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 3)
    content, background = torch.ones(1, 3, 1, 3), torch.zeros(1, 3, 1, 3)
    assert torch.allclose(composite(mask, content, background)[0, 0, 0], torch.tensor([0.0, 0.25, 1.0]))


@pytest.mark.parametrize("bad", [dict(resize=96), dict(resize=32), dict(sep=0), dict(sep=512)])
def test_bad_architecture_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ModelConfig(**bad)


def test_removal_keeps_unmasked_pixels() -> None:
    model = ContentTransferModel(ModelConfig(resize=64)).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    mask = model.segment(x) >= 0.5
    removed = model.remove(x, 0.5)
    assert torch.equal(removed[~mask.expand_as(x)], x[~mask.expand_as(x)])
