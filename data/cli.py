"""``mbu data ...``: make data roots the trainer reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from data.synthetic import SynthConfig

_S = SynthConfig()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare data sets", description="Prepare two-domain data sets.")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth",
        help="write the synthetic glasses benchmark (exact masks, no download)",
        description="Write a deterministic two-domain data set: B = procedural faces, A = the same "
        "distribution with eyeglasses, and testA_masks/ with the exact mask of every test A image.",
    )
    synth.add_argument(
        "--out", required=True, type=Path, help="folder to write trainA/ trainB/ testA/ testB/ testA_masks/ into"
    )
    synth.add_argument(
        "--size", type=int, default=_S.size, help="image side in pixels, 64 or 128 (default: %(default)s)"
    )
    synth.add_argument(
        "--n-train", type=int, default=_S.n_train, help="training images per domain (default: %(default)s)"
    )
    synth.add_argument("--n-test", type=int, default=_S.n_test, help="test images per domain (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=_S.seed, help="seed that fixes every image (default: %(default)s)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=synth_main)


def synth_main(args: argparse.Namespace) -> int:
    from data.synthetic import write_dataset

    cfg = SynthConfig(size=args.size, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    out = write_dataset(cfg, args.out, progress=not args.no_progress)
    print(f"synthetic data ({cfg.n_train} train + {cfg.n_test} test images per domain, {cfg.size}px) in {out}")
    return 0
