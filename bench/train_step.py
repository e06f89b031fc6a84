"""Time one training iteration: the reference's computation against the platform's.

    python bench/train_step.py [--resize 64 128] [--bs 32] [--iters 5] [--device cpu] [--variants]

Baseline: the reference ``mask_train.py`` step as it ran: every image opened
and resized with PIL each time it is drawn (a DataLoader with num_workers=0),
the mask decoder's trunk run twice for A, every loss term computed (zero
weights too), the discriminator step back-propagating into E_common.
Platform: the same hyperparameters on the same images through
``train.loop.train_step`` with the decode-once uint8 batches.

Prints images per second (A and B images of one step count as 2 x bs), the
ratio, and the platform's achieved GFLOP/s against a large float32 matmul
timed in the same run (the machine's practical ceiling). ``--variants`` adds
bf16 autocast, channels_last and torch.compile rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.batches import DomainBatches  # noqa: E402
from data.images import list_images, load_domain  # noqa: E402
from data.synthetic import SynthConfig, write_dataset  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import GRAD_CLIP, Optimizers, build_model, train_step  # noqa: E402
from train.losses import LossWeights  # noqa: E402
from train.reference import reference_autoencoder_losses, reference_discriminator_loss  # noqa: E402

BENCH_IMAGES = 256  # per domain: enough distinct files that PIL decoding is real work


class PilFolder(Dataset):
    """The reference's loading: open, resize, crop, flip and normalise every time."""

    def __init__(self, paths: list[Path], resize: int) -> None:
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(resize),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def baseline_steps(root: Path, cfg: TrainConfig, device: torch.device, iters: int) -> float:
    """Seconds per iteration of the reference computation, data loading included."""
    model = build_model(cfg, device)
    opt = Optimizers.create(model, cfg.lr, cfg.disclr)
    loaders = [
        DataLoader(PilFolder(list_images(root, name), cfg.resize), batch_size=cfg.bs, shuffle=True, drop_last=True)
        for name in ("trainA", "trainB")
    ]
    streams = [iter(loader) for loader in loaders]

    def step() -> None:
        a, b = (next(s).to(device) for s in streams)
        opt.autoencoder.zero_grad()
        total, _ = reference_autoencoder_losses(model, a, b, cfg.weights)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.autoencoder_parameters(), GRAD_CLIP)
        opt.autoencoder.step()
        opt.disc.zero_grad()
        reference_discriminator_loss(model, a, b).backward()
        opt.disc.step()

    return _time(step, iters, device)


def platform_steps(root: Path, cfg: TrainConfig, device: torch.device, iters: int) -> tuple[float, float]:
    """Seconds per iteration of the platform's step, and its FLOPs per iteration."""
    model = build_model(cfg, device)
    opt = Optimizers.create(model, cfg.lr, cfg.disclr)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = [
        DomainBatches(load_domain(root, name, cfg.resize, progress=False).images.to(device), cfg.bs, 0, d)
        for d, name in enumerate(("trainA", "trainB"))
    ]
    counter = iter(range(10**9))

    def step() -> None:
        i = next(counter)
        a, b = (bt.batch(i).contiguous(memory_format=layout) for bt in batches)
        train_step(model, opt, a, b, cfg.weights, bf16=cfg.amp == "bf16")

    seconds = _time(step, iters, device)
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    return seconds, flops.get_total_flops()


def _time(step, iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n float32 matmul: what this machine sustains in practice."""
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = _time(lambda: x @ y, repeats, device)
    return 2 * n**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resize", type=int, nargs="+", default=[64, 128], help="image sides (default: 64 128)")
    parser.add_argument("--bs", type=int, nargs="+", default=[32], help="batch sizes (default: 32)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per row (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--variants", action="store_true", help="also time bf16, channels_last and compile")
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference baseline rows")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(SynthConfig(size=128, n_train=BENCH_IMAGES, n_test=1), Path(tmp), progress=False)
        ceiling = matmul_ceiling(device)
        print(f"device {device}, {torch.get_num_threads()} threads; float32 matmul ceiling {ceiling:.0f} GFLOP/s")
        print(f"{'resize':>6} {'bs':>4} {'variant':<14} {'img/s':>8} {'vs base':>8} {'GFLOP/s':>8} {'% ceil':>7}")
        variants = {"fp32": {}}
        if args.variants:
            variants |= {
                "bf16": {"amp": "bf16"},
                "channels_last": {"channels_last": True},
                "compile": {"compile": True},
            }
        for resize in args.resize:
            for bs in args.bs:
                base_cfg = TrainConfig(resize=resize, bs=bs, weights=LossWeights())
                base = None
                if not args.no_baseline:
                    base = 2 * bs / baseline_steps(root, base_cfg, device, args.iters)
                    print(f"{resize:>6} {bs:>4} {'reference':<14} {base:>8.1f} {'1.00x':>8}")
                for name, overrides in variants.items():
                    cfg = TrainConfig(resize=resize, bs=bs, **overrides)
                    seconds, flops = platform_steps(root, cfg, device, args.iters)
                    rate, gflops = 2 * bs / seconds, flops / seconds / 1e9
                    ratio = f"{rate / base:.2f}x" if base else "-"
                    print(
                        f"{resize:>6} {bs:>4} {name:<14} {rate:>8.1f} {ratio:>8} {gflops:>8.0f} "
                        f"{100 * gflops / ceiling:>6.0f}%",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
