"""``mbu eval``: best-threshold segmentation scores of a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and MLflow load only when a command runs
    from mbu.evaluate.apply import ModelSource
    from mbu.train.config import TrainConfig
    from mbu.train.tracking import Recorder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a run's masks against ground truth over a threshold grid",
        description="Predict masks for the annotated test A images (testA/ with testA_masks/), compute IoU at "
        "every threshold 0.00..1.00, pick the threshold on a validation half and report IoU on the other "
        "half (plus the optimistic best-on-test 'oracle' figure). Writes RUN/report.json (with --masks, or a "
        "--root other than the run's, RUN/eval-NAME-HASH/report.json, NAME that folder's name and HASH a digest "
        "of its full path: the run's own report and those of other folders are kept). With --model instead of "
        "--run, the MLflow model is scored and its report written to --out.",
    )
    add_model_source(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --model: the folder for the report (new, or one that is not a run folder); a --run's report "
        "goes into the run folder",
    )
    parser.add_argument(
        "--root", default=None, help="data root to score on (default: the root the run or model trained on)"
    )
    parser.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="folder of binary masks named like the test A images (default: ROOT/testA_masks/); test A images "
        "without a mask are left out and counted",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the validation/test split (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def add_apply_parsers(subparsers: argparse._SubParsersAction) -> None:
    transfer = subparsers.add_parser(
        "transfer",
        help="put the content of guide A images onto target B images",
        description="For every guide and target: E_common(target) with E_separate(guide) through the mask "
        "decoder over the target. Writes GUIDE__on__TARGET.png for each pair and transfer_grid.png "
        "(guides as rows, targets as columns); a repeated stem gets -2, -3, ... --out must not be a folder "
        "of inputs.",
    )
    add_model_source(transfer)
    transfer.add_argument(
        "--guide", required=True, nargs="+", type=Path, help="images (or folders) whose content is taken"
    )
    transfer.add_argument("--target", required=True, nargs="+", type=Path, help="images (or folders) that receive it")
    transfer.add_argument("--out", required=True, type=Path, help="output folder")
    transfer.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    transfer.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results already in --out: every GUIDE__on__TARGET.png and the grid an earlier transfer "
        "wrote there are deleted first (other files are kept)",
    )
    transfer.set_defaults(func=transfer_main)

    remove = subparsers.add_parser(
        "remove",
        help="remove the content from images",
        description="Where the mask of [E_common(x), E_separate(x)] is >= THRESHOLD, replace x by the content-free "
        "reconstruction D_A([E_common(x), 0]). Any number of images, in batches, on CPU or CUDA; one "
        "output PNG per input, same stem (a repeated stem gets -2, -3, ...). --out must not be a folder of "
        "inputs.",
    )
    add_model_source(remove)
    remove.add_argument("--input", required=True, nargs="+", type=Path, help="images, or folders of images")
    remove.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="mask threshold in [0, 1] (default: the model's own: the --model's, or the val/threshold_best of "
        "the --run folder's report, 0.5 for a run with no report)",
    )
    remove.add_argument("--out", required=True, type=Path, help="output folder")
    remove.add_argument("--bs", type=int, default=32, help="images per batch (default: %(default)s)")
    remove.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    remove.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    remove.set_defaults(func=remove_main)


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--run or --model (with --tracking-uri): where the weights come from."""
    parser.add_argument("--run", type=Path, help="run folder holding checkpoint.pt (or give --model)")
    parser.add_argument(
        "--model",
        metavar="URI",
        help="an MLflow model instead of a run folder: models:/NAME@champion, models:/NAME/VERSION or "
        "runs:/RUN_ID/model (a study registers its champion under its name)",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store that holds --model (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def model_source(args: argparse.Namespace) -> ModelSource:
    from mbu.evaluate.apply import ModelSource

    if args.tracking_uri and args.model is None:
        raise ValueError("--tracking-uri goes with --model; a --run folder holds its own weights")
    return ModelSource(run=args.run, uri=args.model, tracking_uri=args.tracking_uri)


def transfer_main(args: argparse.Namespace) -> int:
    from mbu.evaluate.apply import transfer

    written = transfer(model_source(args), args.guide, args.target, args.out, args.device, args.overwrite)
    print(f"wrote {len(written) - 1} transfers and {written[-1]}")
    return 0


def remove_main(args: argparse.Namespace) -> int:
    from mbu.evaluate.apply import remove

    done = remove(model_source(args), args.input, args.threshold, args.out, args.device, args.bs, args.overwrite)
    given = "given by --threshold" if args.threshold is not None else "the model's own"
    print(
        f"wrote {len(done.written)} images to {args.out}: threshold {done.threshold:.2f} ({given}), "
        f"{done.size}x{done.size} px (the model's training size, whatever the input size)"
    )
    return 0


def log_trained_model(cfg: TrainConfig, recorder: Recorder, device: str, progress: bool) -> str:
    """``mbu train --log-model``'s step, handed to the train layer by ``mbu.cli`` (imports on call)."""
    from mbu.evaluate.model_save import log_trained_model as log

    return log(cfg, recorder, device, progress)


def main(args: argparse.Namespace) -> int:
    from mbu.evaluate.report import evaluate_model, evaluate_run
    from mbu.evaluate.segmentation import figure_warnings

    source = model_source(args)
    if args.model is not None and args.out is None:
        raise ValueError("--model needs --out DIR, the folder for its report")
    if args.model is None and args.out is not None:
        raise ValueError("--out goes with --model (a --run's report is written into its run folder)")
    progress = not args.no_progress
    if args.model is not None:
        loaded = source.load(args.device)
        report = evaluate_model(loaded, args.model, args.out, args.root, args.split_seed, progress, args.masks)
    else:
        report = evaluate_run(args.run, args.root, args.device, args.split_seed, progress, args.masks)
    m = report["metrics"]
    left_out = len(report["unannotated"])
    print(
        f"scored {int(m['val/images'] + m['test/images'])} annotated images "
        f"({int(m['val/images'])} validation, {int(m['test/images'])} test); "
        f"{left_out} test A image(s) without a mask left out\n"
        f"threshold {m['val/threshold_best']:.2f} (chosen on validation, IoU {m['val/iou_best']:.4f})\n"
        f"test IoU {m['test/iou']:.4f} (per-image mean {m['test/iou_per_image']:.4f}); "
        f"oracle {m['test/iou_oracle']:.4f} at {m['test/threshold_oracle']:.2f}; "
        f"all-ones mask {m['baseline/iou_all_ones']:.4f}\n"
        f"report: {report['paths'][0]}"
    )
    for note in figure_warnings(m):
        print(f"warning: {note}")
    return 0
