"""Trial-iterations per second of a population of K trials against K trials one after another.

    python bench/population.py [--device cpu|cuda] [--k 1 2 4 8 16] [--resize 64 128] [--bs 32]
                               [--iters 10] [--rounds 2] [--modes eager captured]

For each K, image size and mode, K trainings (each its own model, optimizers
and batches; learning rates spread so no two are the same trial) run

- one after another (the baseline: what K single-trial workers in turn do), and
- as a population, in the schedule ``mbu.search.running.population`` uses: on CPU
  each training runs up to its next loss log before the next one takes over;
  on CUDA each steps one iteration at a time on its own stream.

Both count only the steady state: every training first runs ``--warmup``
iterations (allocation, cuDNN's algorithm search, the CUDA graph capture)
outside the timing; then ``--rounds`` rounds time both back to back,
alternating which goes first. Printed rates are medians over rounds; the
ratio is the median of the rounds' own ratios (population over in turn) with
their range, since drift on a shared machine touches a pair least. Also
printed: the population's speed-up over today's single trial (K = 1, eager)
and, on CUDA, the peak memory per trial. ``captured`` (``cuda_graph``) is
CUDA only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbu.data.synthetic import SynthConfig, write_dataset  # noqa: E402
from mbu.train.config import TrainConfig  # noqa: E402
from mbu.train.loop import Training, TrainingData  # noqa: E402


def trainings(k: int, root: Path, out: Path, args: argparse.Namespace, resize: int, mode: str) -> list[Training]:
    base = TrainConfig(
        root=str(root), resize=resize, bs=args.bs, iters=10**9, progress_iter=args.progress_iter,
        display_iter=10**9, save_iter=10**9, device=args.device, cuda_graph=mode == "captured",
    )  # fmt: skip
    data = TrainingData.load(base, torch.device(args.device), progress=False)
    made = []
    for i in range(k):
        cfg = TrainConfig(**{**base.to_dict(), "out": str(out / f"k{k}-{i}"), "lr": 2e-4 * (1 + i / k)})
        made.append(Training(cfg, progress=False, data=data))
    return made


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_after_another(runs: list[Training], iters: int, device: str) -> float:
    """Seconds for each training to run ``iters`` iterations, in turn."""
    sync(device)
    start = time.perf_counter()
    for training in runs:
        for _ in range(iters):
            training.step()
    sync(device)
    return time.perf_counter() - start


def as_population(runs: list[Training], iters: int, device: str, streams: list) -> float:
    """Seconds for all trainings to run ``iters`` iterations each, interleaved as a population is."""
    sync(device)
    start = time.perf_counter()
    left = {id(t): iters for t in runs}
    while any(left.values()):
        for training, stream in zip(runs, streams, strict=True):
            if not left[id(training)]:
                continue
            if stream is None:  # CPU: a stretch up to the next loss log
                chunk = min(training.iterations_to_next_log(), left[id(training)])
                for _ in range(chunk):
                    training.step()
            else:  # CUDA: one iteration on this training's stream
                chunk = 1
                with torch.cuda.stream(stream):
                    training.step()
            left[id(training)] -= chunk
    sync(device)
    return time.perf_counter() - start


def warm_up(runs: list[Training], iterations: int, streams: list) -> None:
    for training, stream in zip(runs, streams, strict=True):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(iterations):
                training.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="population sizes")
    parser.add_argument("--resize", type=int, nargs="+", default=[64], help="image sides (default: 64)")
    parser.add_argument("--bs", type=int, default=32, help="batch size per domain (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per trial (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed rounds of both, alternating their order; medians (default: 2)"
    )
    parser.add_argument("--warmup", type=int, default=4, help="untimed iterations per trial first (default: 4)")
    parser.add_argument("--progress_iter", type=int, default=5, help="loss log interval (default: %(default)s)")
    parser.add_argument(
        "--modes", nargs="+", default=["eager"], choices=["eager", "captured"], help="captured: CUDA graphs"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if "captured" in args.modes and not cuda:
        parser.error("--modes captured needs --device cuda")
    torch.backends.cudnn.benchmark = cuda
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, batch {args.bs}")
    print("| size | mode | K | in turn (trial-it/s) | population | ratio (range) | vs K=1 eager | MiB/trial |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for resize in args.resize:
            synth = SynthConfig(size=resize, n_train=max(64, 2 * args.bs), n_test=4, seed=0)
            root = write_dataset(synth, Path(tmp) / f"data{resize}", progress=False)
            single = None
            for mode in args.modes:
                for k in args.k:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        runs = trainings(k, root, Path(tmp) / f"runs{resize}{mode}", args, resize, mode)
                        streams = [torch.cuda.Stream() for _ in runs] if cuda else [None] * k
                        warm_up(runs, args.warmup, streams)
                        seqs, pops = [], []
                        for round_ in range(args.rounds):  # alternating which goes first: drift hits both
                            if round_ % 2:
                                pops.append(as_population(runs, args.iters, args.device, streams))
                            seqs.append(one_after_another(runs, args.iters, args.device))
                            if not round_ % 2:
                                pops.append(as_population(runs, args.iters, args.device, streams))
                        seq, pop = statistics.median(seqs), statistics.median(pops)
                        # Each round's two timings ran back to back: their ratio is what drift touches least.
                        ratios = [s / p for s, p in zip(seqs, pops, strict=True)]  # population over in turn
                        ratio, spread = statistics.median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}"
                    except torch.OutOfMemoryError:
                        print(f"| {resize} | {mode} | {k} | out of memory | | | | |")
                        break
                    seq_rate, pop_rate = k * args.iters / seq, k * args.iters / pop
                    if mode == "eager" and k == 1:
                        single = seq_rate
                    versus = f"{pop_rate / single:.2f}x" if single else "n/a"
                    memory = f"{torch.cuda.max_memory_allocated() / k / 2**20:.0f}" if cuda else "n/a"
                    print(
                        f"| {resize} | {mode} | {k} | {seq_rate:.2f} | {pop_rate:.2f} | {ratio:.3f} ({spread}) "
                        f"| {versus} | {memory} |",
                        flush=True,
                    )
                    del runs


if __name__ == "__main__":
    main()
