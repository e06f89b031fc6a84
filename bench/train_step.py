"""Time one training iteration: the reference's computation against the platform's.

    python bench/train_step.py [--resize 64 128] [--bs 32] [--rounds 9] [--processes 1] [--device cpu] [--variants ...]

Baseline: the reference ``mask_train.py`` step as it ran: every image opened
and resized with PIL each time it is drawn (a DataLoader with num_workers=0),
the mask decoder's trunk run twice for A, every loss term computed (zero
weights too), the discriminator step back-propagating into E_common.
Platform: the same hyperparameters on the same images through
``train.step.train_step`` with the decode-once uint8 batches.

Prints images per second (A and B images of one step count as 2 x bs; the
median over rounds), the ratio to the reference (the median of each round's
own ratio, the rows timed in turn within a round, with the rounds' range),
and the platform's achieved GFLOP/s against a large float32 matmul timed
just before the row (the machine's practical ceiling at that moment). ``--variants`` picks
the platform rows: fp32 (the default, identical math), bf16 autocast,
channels_last, both, torch.compile, fp32-stock (fp32 on PyTorch's default
convolution kernels, to separate the per-layer CPU kernel choice of
``mbu.train.model`` from the removed work) and fp32-relu-decoders (mbu 0.1's
ReLU decoders, to time the paper's LeakyReLU against them). The baseline runs
the stock kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity import use_relu_decoders  # noqa: E402  (bench/ is on sys.path: this script's folder)

from mbu.data.batches import DomainBatches  # noqa: E402
from mbu.data.images import list_images, load_domain  # noqa: E402
from mbu.data.synthetic import SynthConfig, write_dataset  # noqa: E402
from mbu.train.config import TrainConfig  # noqa: E402
from mbu.train.model import use_stock_kernels  # noqa: E402
from mbu.train.reference import reference_autoencoder_losses, reference_discriminator_loss  # noqa: E402
from mbu.train.step import ADAM_BETAS, GRAD_CLIP, LossFunctions, Optimizers, build_model, train_step  # noqa: E402

VARIANTS = {  # platform configurations: TrainConfig overrides
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"amp": "bf16", "channels_last": True},
    "compile": {"compile": True},
    "fp32-stock": {},  # fp32 on PyTorch's default convolution kernels: the per-layer CPU choice undone
    "fp32-relu-decoders": {},  # fp32 with mbu 0.1's ReLU decoders: what the paper's LeakyReLU costs
}
STOCK_KERNELS = {"fp32-stock"}
RELU_DECODERS = {"fp32-relu-decoders"}
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


def baseline_stepper(root: Path, cfg: TrainConfig, device: torch.device) -> Callable[[], None]:
    """One iteration of the reference computation, data loading included."""
    model = build_model(cfg, device)
    use_stock_kernels(model)  # the reference ran PyTorch's default convolutions
    # The reference's optimizers: PyTorch's default Adam implementation.
    opt = Optimizers(
        torch.optim.Adam(model.autoencoder_parameters(), lr=cfg.lr, betas=ADAM_BETAS),
        torch.optim.Adam(model.disc.parameters(), lr=cfg.disclr, betas=ADAM_BETAS),
    )
    loaders = [
        DataLoader(PilFolder(list_images(root, name), cfg.resize), batch_size=cfg.bs, shuffle=True, drop_last=True)
        for name in ("trainA", "trainB")
    ]
    streams = [_epochs(loader) for loader in loaders]

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

    return step


def _epochs(loader: DataLoader):
    """Batches forever, reshuffling at each epoch as the reference's loop did."""
    while True:
        yield from loader


def platform_stepper(
    root: Path, cfg: TrainConfig, device: torch.device, stock_kernels: bool = False, relu_decoders: bool = False
) -> tuple[Callable[[], None], float]:
    """One iteration of the platform's step, and its FLOPs (counted on one extra step)."""
    model = build_model(cfg, device)
    if stock_kernels:
        use_stock_kernels(model)
    if relu_decoders:
        use_relu_decoders(model)
    opt = Optimizers.create(model, cfg.lr, cfg.disclr)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = [
        DomainBatches(load_domain(root, name, cfg.resize, progress=False).images.to(device), cfg.bs, 0, d)
        for d, name in enumerate(("trainA", "trainB"))
    ]
    counter = iter(range(10**9))
    loss_fns = LossFunctions.create(cfg.compile)

    def step() -> None:
        i = next(counter)
        a, b = (bt.batch(i).contiguous(memory_format=layout) for bt in batches)
        train_step(model, opt, a, b, cfg.weights, cfg.amp == "bf16", loss_fns)

    step()  # warm-up (and compilation, with --compile) before counting
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    return step, flops.get_total_flops()


def _time(step: Callable[[], None], iters: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds per call over ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def interleaved(steps: dict[str, Callable[[], None]], iters: int, rounds: int, device: torch.device) -> dict:
    """Each step's mean seconds per call in every round; the steps take turns (the order reversed every other
    round) so that drift on a shared machine hits all of them alike and each round pairs them."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds[name].append(_time(steps[name], iters, device))
    return seconds


def summary(seconds: dict[str, list[float]], name: str, images: int) -> tuple[float, str]:
    """Median images/s of ``name``, and its median paired ratio to the reference with the rounds' range."""
    rate = images / statistics.median(seconds[name])
    if "reference" not in seconds:
        return rate, "-"
    ratios = [ref / own for ref, own in zip(seconds["reference"], seconds[name], strict=True)]
    return rate, f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of a large float32 matmul: what this machine sustains in practice."""
    n = 8192 if device.type == "cuda" else 2048  # a GPU needs a larger product to be kept busy
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = _time(lambda: x @ y, repeats, device)
    return 2 * n**3 / seconds / 1e9


def time_rows(args: argparse.Namespace, root: Path, resize: int, bs: int, device: torch.device) -> dict:
    """One process's rounds of one (resize, bs): seconds per row and round, FLOPs per step, the ceiling."""
    steps, flops = {}, {}
    if not args.no_baseline:
        steps["reference"] = baseline_stepper(root, TrainConfig(resize=resize, bs=bs), device)
    for name in args.variants:
        steps[name], flops[name] = platform_stepper(
            root,
            TrainConfig(resize=resize, bs=bs, **VARIANTS[name]),
            device,
            name in STOCK_KERNELS,
            name in RELU_DECODERS,
        )
    ceiling = matmul_ceiling(device)  # per row: the machine's state when this row was timed
    return {"seconds": interleaved(steps, args.iters, args.rounds, device), "flops": flops, "ceiling": [ceiling]}


def pooled_rows(args: argparse.Namespace, resize: int, bs: int) -> dict:
    """``time_rows`` in ``--processes`` fresh processes, their rounds pooled: the platform's step was seen
    to run at a speed of its own in each process, moving all that process's rounds alike, so rounds of
    one process are not independent samples (see docs/performance.md, "Repeatability")."""
    pooled: dict = {"seconds": {}, "flops": {}, "ceiling": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = Path(tmp) / f"{k}.json"
            command = [sys.executable, __file__, "--resize", str(resize), "--bs", str(bs), "--iters", str(args.iters)]
            command += ["--rounds", str(args.rounds), "--device", args.device, "--variants", *args.variants]
            command += ["--no-baseline"] * args.no_baseline + ["--rows-json", str(out)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            part = json.loads(out.read_text())
            for name, values in part["seconds"].items():
                pooled["seconds"].setdefault(name, []).extend(values)
            pooled["flops"].update(part["flops"])
            pooled["ceiling"] += part["ceiling"]
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resize", type=int, nargs="+", default=[64, 128], help="image sides (default: 64 128)")
    parser.add_argument("--bs", type=int, nargs="+", default=[32], help="batch sizes (default: 32)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per round (default: %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="rounds in which every row is timed in turn; rates are medians over rounds, ratios the median of "
        "the rounds' own ratios to the reference, with their range (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["fp32"],
        help="platform configurations to time (default: fp32)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference baseline rows")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="time the rounds in this many fresh processes, one after another, and pool them: two runs then "
        "agree more closely than with the same rounds in one process (default: %(default)s)",
    )
    parser.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)  # a child's output
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.processes > 1:
        print_table(args, device, lambda resize, bs: pooled_rows(args, resize, bs))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(SynthConfig(size=128, n_train=BENCH_IMAGES, n_test=1), Path(tmp), progress=False)
        if args.rows_json is not None:  # a child of --processes: one (resize, bs), rows as JSON
            args.rows_json.write_text(json.dumps(time_rows(args, root, args.resize[0], args.bs[0], device)))
            return
        print_table(args, device, lambda resize, bs: time_rows(args, root, resize, bs, device))


def print_table(args: argparse.Namespace, device: torch.device, rows: Callable[[int, int], dict]) -> None:
    """The table: one line per (resize, bs, row), from ``rows(resize, bs)``."""
    print(f"device {device}, {torch.get_num_threads()} threads; ceiling: a float32 matmul timed before each row")
    if args.processes > 1:
        print(f"{args.processes} processes x {args.rounds} rounds of {args.iters} iterations, pooled")
    header = f"{'resize':>6} {'bs':>4} {'variant':<18} {'img/s':>8} {'vs reference (range)':>22}"
    print(f"{header} {'GFLOP/s':>8} {'ceiling':>8} {'% ceil':>7}")
    for resize in args.resize:
        for bs in args.bs:
            timed = rows(resize, bs)
            ceiling = statistics.median(timed["ceiling"])
            for name in timed["seconds"]:
                rate, ratio = summary(timed["seconds"], name, 2 * bs)
                line = f"{resize:>6} {bs:>4} {name:<18} {rate:>8.1f} {ratio:>22}"
                if name in timed["flops"]:
                    achieved = timed["flops"][name] * rate / (2 * bs) / 1e9
                    line += f" {achieved:>8.0f} {ceiling:>8.0f} {100 * achieved / ceiling:>6.0f}%"
                print(line, flush=True)


if __name__ == "__main__":
    main()
