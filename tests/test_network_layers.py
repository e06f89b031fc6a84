"""The built model against the paper's architecture, stated here independently of ``train/model.py``.

The table below is written from the reference code's ``mask_models.py`` (Mokady et
al., ICLR 2020), not from this project's modules: every layer in order with its type,
channels, kernel, stride, padding, bias, BatchNorm settings and activation slope. A
change to the model that drifts from it fails here, naming the network and layer.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mbu.train.model import ContentTransferModel, ModelConfig

LayerSpec = tuple  # ("Conv2d", c_in, c_out, kernel, stride, padding, bias), ("LeakyReLU", slope), ...


def _down(channels: list[int]) -> list[LayerSpec]:
    layers: list[LayerSpec] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [("Conv2d", c_in, c_out, 4, 2, 1, True), ("BatchNorm2d", c_out, 1e-5, 0.1, True), ("LeakyReLU", 0.2)]
    return layers


def _up(out_channels: int) -> list[LayerSpec]:
    layers: list[LayerSpec] = []
    for c_in, c_out in [(512, 512), (512, 256), (256, 128), (128, 64), (64, 32)]:
        layers += [
            ("ConvTranspose2d", c_in, c_out, 4, 2, 1, True),
            ("BatchNorm2d", c_out, 1e-5, 0.1, True),
            ("LeakyReLU", 0.2),
        ]
    return layers + [("ConvTranspose2d", 32, out_channels, 4, 2, 1, True)]


def paper_layers(resize: int, sep: int) -> dict[str, list[LayerSpec]]:
    """The reference's five networks (its names: e1, e2, d_a, d_b, disc), layer by layer."""
    common, side = 512 - sep, resize // 64
    return {
        "e_common": _down([3, 32, 64, 128, 256, common, common]),
        "e_separate": _down([3, 32, 64, 128, 128, 128, sep]),
        "decoder": _up(3),  # then tanh
        "mask_decoder": _up(4),  # then sigmoid(channel 0), tanh(channels 1..3)
        "disc": [
            ("Linear", common * side * side, 512, True),
            ("LeakyReLU", 0.2),
            ("Linear", 512, 1, True),
            ("Sigmoid",),
        ],
    }


def describe(layer: nn.Module) -> LayerSpec:
    """A leaf module in the table's terms."""
    if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
        kind = "ConvTranspose2d" if isinstance(layer, nn.ConvTranspose2d) else "Conv2d"
        return (kind, layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.stride[0], layer.padding[0],
                layer.bias is not None)  # fmt: skip
    if isinstance(layer, nn.BatchNorm2d):
        assert layer.track_running_stats, "BatchNorm without running statistics"
        return ("BatchNorm2d", layer.num_features, layer.eps, layer.momentum, layer.affine)
    if isinstance(layer, nn.LeakyReLU):
        return ("LeakyReLU", layer.negative_slope)
    if isinstance(layer, nn.Linear):
        return ("Linear", layer.in_features, layer.out_features, layer.bias is not None)
    return (type(layer).__name__,)


def leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def architecture_drift(model: ContentTransferModel, resize: int, sep: int) -> list[str]:
    """Every place where the built model differs from the paper's table, one line each."""
    problems = []
    for name, expected in paper_layers(resize, sep).items():
        built = [describe(layer) for layer in leaves(getattr(model, name))]
        for index, (want, got) in enumerate(zip(expected, built, strict=False)):
            if want != got:
                problems.append(f"{name} layer {index}: paper {want}, built {got}")
        if len(built) != len(expected):
            problems.append(f"{name}: paper has {len(expected)} layers, built {len(built)}")
    return problems


@pytest.mark.parametrize(("resize", "sep"), [(64, 25), (128, 25), (128, 100), (256, 25)])
def test_model_is_the_papers_layer_for_layer(resize: int, sep: int) -> None:
    model = ContentTransferModel(ModelConfig(resize=resize, sep=sep))
    drift = architecture_drift(model, resize, sep)
    assert not drift, "the model drifted from the paper's:\n" + "\n".join(drift)


def test_a_one_layer_drift_is_named() -> None:
    """The check catches what the platform once shipped: ReLU in one decoder block."""
    model = ContentTransferModel(ModelConfig(resize=64, sep=25))
    model.mask_decoder.trunk.net[5] = nn.ReLU(inplace=True)  # third layer of the second block
    assert architecture_drift(model, 64, 25) == ["mask_decoder layer 5: paper ('LeakyReLU', 0.2), built ('ReLU',)"]
    model = ContentTransferModel(ModelConfig(resize=64, sep=25))
    model.e_separate.net[1].momentum = 0.01
    assert architecture_drift(model, 64, 25) == [
        "e_separate layer 1: paper ('BatchNorm2d', 32, 1e-05, 0.1, True), built ('BatchNorm2d', 32, 1e-05, 0.01, True)"
    ]


def _stock_network(specs: list[LayerSpec]) -> nn.Sequential:
    """The table as plain ``torch.nn`` layers."""
    layers: list[nn.Module] = []
    for kind, *args in specs:
        if kind in ("Conv2d", "ConvTranspose2d"):
            c_in, c_out, k, stride, pad, bias = args
            layers.append(getattr(nn, kind)(c_in, c_out, k, stride, pad, bias=bias))
        elif kind == "BatchNorm2d":
            layers.append(nn.BatchNorm2d(args[0], eps=args[1], momentum=args[2], affine=args[3]))
        elif kind == "LeakyReLU":
            layers.append(nn.LeakyReLU(args[0]))
        elif kind == "Linear":
            layers.append(nn.Linear(*args))
        else:
            layers.append(getattr(nn, kind)())
    return nn.Sequential(*layers)


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    ours, theirs = list(source.state_dict().values()), list(target.state_dict().values())
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    with torch.no_grad():
        for mine, stock in zip(ours, theirs, strict=True):
            stock.copy_(mine)


def test_forward_passes_equal_the_papers_computation() -> None:
    """Same weights in plain torch.nn layers, wired as the reference does: same codes, images and masks."""
    resize, sep = 128, 25
    side = resize // 64
    torch.manual_seed(0)
    model = ContentTransferModel(ModelConfig(resize=resize, sep=sep))
    stock = {name: _stock_network(specs) for name, specs in paper_layers(resize, sep).items()}
    for name, net in stock.items():
        _copy_weights(getattr(model, name), net)
    model.eval()
    for net in stock.values():
        net.eval()
    a, b = torch.rand(2, 4, 3, resize, resize) * 2 - 1

    with torch.no_grad():
        # Encoders: the last map flattened. Decoders: the code viewed as 512 x s x s.
        common, separate = stock["e_common"](a).flatten(1), stock["e_separate"](a).flatten(1)
        code = torch.cat([common, separate], 1).view(-1, 512, side, side)
        image = torch.tanh(stock["decoder"](code))
        raw = stock["mask_decoder"](code)
        mask, content = torch.sigmoid(raw[:, :1]), torch.tanh(raw[:, 1:])
        composited = mask * content + (1 - mask) * b

        built_common, built_separate = model.e_common(a), model.e_separate(a)
        built_code = model.code(built_common, built_separate)
        built_composite, built_mask = model.mask_decoder(built_code, b)
        close = dict(rtol=1e-4, atol=1e-5)  # the CPU kernel choice rounds differently from stock convolutions
        torch.testing.assert_close(built_common, common, **close)
        torch.testing.assert_close(built_separate, separate, **close)
        torch.testing.assert_close(model.decoder(built_code), image, **close)
        torch.testing.assert_close(built_mask, mask, **close)
        torch.testing.assert_close(built_composite, composited, **close)
        torch.testing.assert_close(model.disc(built_common), stock["disc"](common), **close)


def test_default_initialisation() -> None:
    """No custom init: PyTorch's defaults, U(±1/sqrt(fan_in)) weights and biases, BatchNorm at (1, 0)."""
    torch.manual_seed(0)
    model = ContentTransferModel(ModelConfig(resize=64, sep=25))
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            # fan_in: input channels x kernel area; a transposed conv's weight is (in, out, k, k), fan counted on dim 1.
            fan_in = layer.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            for param in (layer.weight, layer.bias):
                assert param.abs().max() <= bound + 1e-7, name
                if param.numel() >= 1000:  # a uniform sample this large reaches near its bound and centres on 0
                    assert param.abs().max() > 0.95 * bound, name
                    assert abs(param.mean().item()) < 0.1 * bound, name
        elif isinstance(layer, nn.BatchNorm2d):
            assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0), name
            assert torch.all(layer.running_mean == 0) and torch.all(layer.running_var == 1), name
