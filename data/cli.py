"""``mbu data ...``: make data roots the trainer reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from mbu.data.synthetic import SynthConfig

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
    _add_celeba(commands)
    _add_celebamask_hq(commands)
    _add_folders(commands)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the CelebA and CelebAMask-HQ commands: which images form A and B."""
    from mbu.data.celeba import CONFIG_NAMES, CONFIGS

    rules = "; ".join(f"{name} ({rule.description})" for name, rule in CONFIGS.items())
    parser.add_argument("--dest", required=True, type=Path, help="folder to write trainA.txt ... into")
    parser.add_argument(
        "--config",
        default="glasses",
        choices=CONFIG_NAMES,
        help=f"which images form A vs B: {rules}; custom (--attribute vs not) (default: %(default)s)",
    )
    parser.add_argument(
        "--attribute", help="with --config custom: the attribute (e.g. Wearing_Hat) that is 1 in A and -1 in B"
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="NAME=±1",
        help="keep only images with this attribute value in both domains, e.g. Male=-1 (repeatable)",
    )
    parser.add_argument(
        "--partition",
        type=Path,
        help="CelebA's list_eval_partition.txt: test images come from its test split and no test face is "
        "trained on (default: the first --num-test images of each domain are the test set)",
    )
    parser.add_argument(
        "--num-test",
        "--num_test_imgs",
        dest="num_test",
        type=int,
        help="test images per domain (default: 64, the reference's; with --partition, the whole test split)",
    )


def _add_celeba(commands: argparse._SubParsersAction) -> None:
    celeba = commands.add_parser(
        "celeba",
        help="split CelebA into A/B list files by attribute (the reference preprocess.py)",
        description="Select domain A (with the content) and B (without) from CelebA's attribute file and write "
        "the list-file layout that mbu train --root reads. Prints the counts per domain and split.",
    )
    celeba.add_argument("--root", required=True, type=Path, help="the img_align_celeba image folder")
    celeba.add_argument("--attributes", required=True, type=Path, help="list_attr_celeba.txt")
    _add_selection(celeba)
    celeba.add_argument(
        "--crop",
        type=int,
        default=178,
        help="centre square of this many pixels cut before resizing; 178 keeps the whole width of the 178x218 "
        "aligned faces without squashing them, smaller values zoom in, 0 turns it off (default: %(default)s)",
    )
    celeba.set_defaults(func=celeba_main)


def _add_celebamask_hq(commands: argparse._SubParsersAction) -> None:
    hq = commands.add_parser(
        "celebamask-hq",
        help="CelebAMask-HQ split with ground-truth masks for scoring",
        description="Select A and B from CelebAMask-HQ's attribute file (same configs as celeba), write the list "
        "files, and build testA_masks/ from its part annotations (glasses: eye_g; hair tasks: hair). Test A images "
        "with no annotation are listed in testA_unannotated.txt and left out of scoring.",
    )
    hq.add_argument("--root", required=True, type=Path, help="the CelebAMask-HQ folder (CelebA-HQ-img/ ...)")
    _add_selection(hq)
    hq.add_argument(
        "--parts", nargs="+", default=[], help="annotation parts whose union is the mask (default: the config's)"
    )
    hq.add_argument("--mapping", type=Path, help="CelebA-HQ-to-CelebA-mapping.txt, needed to use CelebA's --partition")
    hq.set_defaults(func=celebamask_hq_main)


def _add_folders(commands: argparse._SubParsersAction) -> None:
    folders = commands.add_parser(
        "folders",
        help="check a trainA/ trainB/ testA/ testB/ tree and write its list files",
        description="Open every image of ROOT/trainA, trainB, testA and testB (any common type; grey, palette, RGBA "
        "and 16-bit are converted to RGB) and write DEST/trainA.txt ... A testA_masks/ folder is linked beside them.",
    )
    folders.add_argument("--root", required=True, type=Path, help="folder holding trainA/ trainB/ testA/ testB/")
    folders.add_argument("--dest", required=True, type=Path, help="folder to write the list files into")
    folders.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable images out (listed in DEST/skipped_images.txt) instead of stopping at the first",
    )
    folders.add_argument("--no-progress", action="store_true", help="no progress bar")
    folders.set_defaults(func=folders_main)


def _requirements(args: argparse.Namespace) -> tuple:
    from mbu.data.celeba import parse_requirement

    return tuple(parse_requirement(text) for text in args.require)


def celeba_main(args: argparse.Namespace) -> int:
    from mbu.data.celeba import CelebaConfig, prepare_celeba

    cfg = CelebaConfig(
        root=args.root,
        attributes=args.attributes,
        dest=args.dest,
        config=args.config,
        attribute=args.attribute,
        require=_requirements(args),
        partition=args.partition,
        num_test=args.num_test,
        crop=args.crop or None,
    )
    split = prepare_celeba(cfg)
    print(f"celeba {args.config}: {split.summary()} -> {args.dest}")
    return 0


def celebamask_hq_main(args: argparse.Namespace) -> int:
    from mbu.data.celebamask_hq import UNANNOTATED_FILE, MaskHQConfig, prepare_celebamask_hq

    cfg = MaskHQConfig(
        root=args.root,
        dest=args.dest,
        config=args.config,
        attribute=args.attribute,
        require=_requirements(args),
        parts=tuple(args.parts),
        mapping=args.mapping,
        partition=args.partition,
        num_test=args.num_test,
    )
    split, unannotated = prepare_celebamask_hq(cfg)
    masks = len(split.test_a) - len(unannotated)
    print(f"celebamask-hq {args.config}: {split.summary()}; {masks} test A masks -> {args.dest}")
    if unannotated:
        print(f"{len(unannotated)} test A image(s) have no annotation (listed in {args.dest / UNANNOTATED_FILE})")
    return 0


def folders_main(args: argparse.Namespace) -> int:
    from mbu.data.folders import prepare_folders

    counts = prepare_folders(args.root, args.dest, args.skip_bad, progress=not args.no_progress)
    print(f"folders: {', '.join(f'{k} {v}' for k, v in counts.items())} -> {args.dest}")
    return 0


def synth_main(args: argparse.Namespace) -> int:
    from mbu.data.synthetic import write_dataset

    cfg = SynthConfig(size=args.size, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    out = write_dataset(cfg, args.out, progress=not args.no_progress)
    print(f"synthetic data ({cfg.n_train} train + {cfg.n_test} test images per domain, {cfg.size}px) in {out}")
    return 0
