"""Time each convolution of the model on PyTorch's stock kernel and as one matrix multiply.

    python bench/conv_layers.py [--resize 64 128] [--bs 32] [--rounds 5]

For every conv and transposed conv of the model at the given image size (their
input shapes are recorded from one forward pass), times forward + backward of
the stock layer and of ``train.model``'s matrix-multiply form, taking turns
(best of ``--rounds``). The last column says which one the model uses on a CPU
in float32 (``MATMUL_MAX_POSITIONS`` / ``MATMUL_MIN_CHANNELS``). The first
layer of each encoder gets no input gradient, as in training.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbu.train.model import (  # noqa: E402
    ContentTransferModel,
    DownConv,
    ModelConfig,
    UpConv,
    conv_by_matmul,
    conv_transpose_by_matmul,
    uses_matmul_form,
)


def layer_inputs(resize: int, bs: int) -> list[tuple[torch.nn.Module, torch.Size]]:
    """Each distinct (layer shape, input shape) of the encoders and trunks, in model order."""
    model = ContentTransferModel(ModelConfig(resize=resize))
    seen: dict[tuple, tuple[torch.nn.Module, torch.Size]] = {}

    def record(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        key = (type(layer).__name__, layer.in_channels, layer.out_channels, tuple(inputs[0].shape))
        seen.setdefault(key, (layer, inputs[0].shape))

    for layer in model.modules():
        if isinstance(layer, DownConv | UpConv):
            layer.register_forward_pre_hook(record)
    with torch.no_grad():
        image = torch.zeros(bs, 3, resize, resize)
        code = model.code(model.e_common(image), model.e_separate(image))
        model.decoder(code)
        model.mask_decoder.layers(code)
    return list(seen.values())


def kernel_forms(layer: DownConv | UpConv) -> tuple[Callable, Callable]:
    """The layer's stock functional form and its matrix-multiply form, same parameters."""
    params = (layer.weight, layer.bias, layer.stride[0], layer.padding[0])
    if isinstance(layer, DownConv):
        return partial(_call, F.conv2d, params), partial(_call, conv_by_matmul, params)
    return partial(_call, F.conv_transpose2d, params), partial(_call, conv_transpose_by_matmul, params)


def _call(fn: Callable, params: tuple, x: torch.Tensor) -> torch.Tensor:
    return fn(x, *params)


def forward_backward_seconds(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resize", type=int, nargs="+", default=[64, 128], help="image sides (default: 64 128)")
    parser.add_argument("--bs", type=int, default=32, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds; the best is kept (default: %(default)s)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; forward + backward, ms (best of {args.rounds})")
    print(f"{'resize':>6} {'layer':<28} {'input':<18} {'stock':>7} {'matmul':>7} {'ratio':>6}  model uses")
    for resize in args.resize:
        for layer, shape in layer_inputs(resize, args.bs):
            x = torch.randn(shape, requires_grad=layer.in_channels != 3)
            stock, matmul = kernel_forms(layer)
            best = {"stock": float("inf"), "matmul": float("inf")}
            for round_ in range(args.rounds + 1):
                for name, fn in (("stock", stock), ("matmul", matmul)):
                    seconds = forward_backward_seconds(fn, x)
                    if round_:  # the first round only warms up
                        best[name] = min(best[name], seconds)
            kind = "conv" if isinstance(layer, DownConv) else "convT"
            label = f"{kind} {layer.in_channels}->{layer.out_channels}"
            uses = "matmul" if uses_matmul_form(layer, x) else "stock"
            print(
                f"{resize:>6} {label:<28} {'x'.join(map(str, shape)):<18} {best['stock'] * 1e3:>7.1f} "
                f"{best['matmul'] * 1e3:>7.1f} {best['stock'] / best['matmul']:>5.2f}x  {uses}",
                flush=True,
            )


if __name__ == "__main__":
    main()
