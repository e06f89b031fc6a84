"""``mbu eval``: best-threshold segmentation scores of a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a run's masks against ground truth over a threshold grid",
        description="Predict masks for the annotated test A images (testA/ with testA_masks/), compute IoU at "
        "every threshold 0.00..1.00, pick the threshold on a validation half and report IoU on the other "
        "half (plus the optimistic best-on-test 'oracle' figure). Writes RUN/report.json.",
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder holding checkpoint.pt")
    parser.add_argument("--root", default=None, help="data root to score on (default: the root the run trained on)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the validation/test split (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from evaluate.report import evaluate_run

    report = evaluate_run(args.run, args.root, args.device, args.split_seed, progress=not args.no_progress)
    m = report["metrics"]
    print(
        f"scored {int(m['val/images'] + m['test/images'])} annotated images "
        f"({int(m['val/images'])} validation, {int(m['test/images'])} test)\n"
        f"threshold {m['val/threshold_best']:.2f} (chosen on validation, IoU {m['val/iou_best']:.4f})\n"
        f"test IoU {m['test/iou']:.4f} (per-image mean {m['test/iou_per_image']:.4f}); "
        f"oracle {m['test/iou_oracle']:.4f} at {m['test/threshold_oracle']:.2f}; "
        f"all-ones mask {m['baseline/iou_all_ones']:.4f}\n"
        f"report: {args.run / 'report.json'}"
    )
    return 0
