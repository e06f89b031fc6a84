"""Time the one-pass IoU sweep against a per-threshold loop computing the same figures.

    python bench/iou_sweep.py [--masks 1000] [--side 128] [--repeats 3] [--device cpu]

Both compute, for every threshold of the 0.00..1.00 grid, the data-set IoU and
every image's IoU. Prints both times (best of the repeats) and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbu.evaluate.iou import safe_iou, sweep, threshold_grid  # noqa: E402


def per_threshold_loop(probs: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor):
    """The obvious way: threshold the whole stack once per grid point."""
    flat_p, flat_t = probs.flatten(1), truth.flatten(1)
    gt = flat_t.sum(1)
    dataset, per_image = [], []
    for t in thresholds:
        pred = flat_p >= t
        inter = (pred & flat_t).sum(1)
        union = pred.sum(1) + gt - inter
        dataset.append(safe_iou(inter.sum(), union.sum()))
        per_image.append(safe_iou(inter, union))
    return torch.stack(dataset), torch.stack(per_image, 1)


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=1000, help="number of masks (default: %(default)s)")
    parser.add_argument("--side", type=int, default=128, help="mask side in pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where both computations run: cpu or cuda (default: cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(args.masks, args.side, args.side, generator=g).to(device)
    truth = (torch.rand(args.masks, args.side, args.side, generator=g) < 0.2).to(device)
    thresholds = threshold_grid()

    counts = sweep(probs, truth, thresholds)
    loop_dataset, loop_per_image = per_threshold_loop(probs, truth, thresholds)
    assert torch.allclose(counts.dataset_iou(), loop_dataset.cpu())
    assert torch.allclose(counts.per_image_iou(), loop_per_image.cpu())

    one_pass = best_time(lambda: sweep(probs, truth, thresholds), args.repeats, device)
    loop = best_time(lambda: per_threshold_loop(probs, truth, thresholds), args.repeats, device)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"{args.masks} masks of {args.side}x{args.side}, {len(thresholds)} thresholds, {where}")
    print(f"per-threshold loop : {loop:8.3f} s")
    print(f"one-pass sweep     : {one_pass:8.3f} s")
    print(f"speed-up           : {loop / one_pass:8.1f}x")


if __name__ == "__main__":
    main()
