from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mbu.train.model import (
    ContentTransferModel,
    DownConv,
    ModelConfig,
    UpConv,
    composite,
    conv_by_matmul,
    conv_transpose_by_matmul,
    use_stock_kernels,
)


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


@pytest.mark.parametrize(
    ("transposed", "c_in", "c_out", "side"),
    [(False, 487, 487, 4), (False, 256, 487, 2), (False, 3, 5, 8), (True, 512, 512, 1), (True, 512, 256, 4)],
)
def test_matmul_forms_compute_the_convolution(transposed: bool, c_in: int, c_out: int, side: int) -> None:
    """In float64 the matrix-multiply forms match PyTorch's convolutions, values and gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, side, side, dtype=torch.float64, generator=gen, requires_grad=True)
    shape = (c_in, c_out, 4, 4) if transposed else (c_out, c_in, 4, 4)
    weight = (torch.randn(shape, dtype=torch.float64, generator=gen) * 0.05).requires_grad_()
    bias = torch.randn(c_out, dtype=torch.float64, generator=gen, requires_grad=True)
    stock, matmul = (F.conv_transpose2d, conv_transpose_by_matmul) if transposed else (F.conv2d, conv_by_matmul)

    outputs, grads = [], []
    for fn in (stock, matmul):
        out = fn(x, weight, bias, 2, 1)
        target = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads.append(torch.autograd.grad((out - target).square().sum(), (x, weight, bias)))
        outputs.append(out)
    assert outputs[1].shape == outputs[0].shape
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_layers_pick_the_matmul_form_only_where_it_is_faster() -> None:
    """Wide layers on <= 16 positions run the matrix multiply on CPU float32; the rest, and bf16, run stock."""
    torch.manual_seed(0)
    wide, thin = DownConv(256, 256, 4, 2, 1), UpConv(256, 128, 4, 2, 1)
    small_map, large_map = torch.randn(2, 256, 4, 4), torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(wide(small_map), conv_by_matmul(small_map, wide.weight, wide.bias, 2, 1))
        assert torch.equal(wide(large_map), F.conv2d(large_map, wide.weight, wide.bias, 2, 1))
        assert torch.equal(thin(small_map), F.conv_transpose2d(small_map, thin.weight, thin.bias, 2, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = F.conv2d(small_map, wide.weight, wide.bias, 2, 1)
            assert torch.equal(wide(small_map), expected)
        use_stock_kernels(wide)
        assert torch.equal(wide(small_map), F.conv2d(small_map, wide.weight, wide.bias, 2, 1))


@pytest.mark.parametrize("resize", [64, 128])
def test_model_gradients_are_as_accurate_with_the_matmul_forms(resize: int) -> None:
    """Against a float64 copy, the float32 gradients are as close with the CPU kernel choice as with stock kernels."""
    torch.manual_seed(0)
    model = ContentTransferModel(ModelConfig(resize=resize))
    x = torch.randn(8, 3, resize, resize)
    target = torch.rand(8, 3, resize, resize) * 2 - 1

    def gradient(net: ContentTransferModel, dtype: torch.dtype) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        code = net.code(net.e_common(x.to(dtype)), net.e_separate(x.to(dtype)))
        mask, content = net.mask_decoder.layers(code)
        loss = (net.decoder(code) - target.to(dtype)).abs().mean() + (
            composite(mask, content, x.to(dtype)) - x
        ).abs().mean()
        loss.backward()
        # Conv biases in front of BatchNorm have a zero gradient: left out, their float noise means nothing.
        return torch.cat([p.grad.double().flatten() for p in net.parameters() if p.grad is not None and p.ndim != 1])

    exact = gradient(copy.deepcopy(model).double(), torch.float64)
    tuned = gradient(model, torch.float32)
    use_stock_kernels(model)
    stock = gradient(model, torch.float32)
    tuned_error = ((tuned - exact).norm() / exact.norm()).item()
    stock_error = ((stock - exact).norm() / exact.norm()).item()
    assert stock_error < 1e-2  # float32 rounding through the deep net, whatever the kernels
    assert tuned_error < max(3 * stock_error, 1e-4)
