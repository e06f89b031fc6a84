"""``mbu train``: the reference ``mask_train.py`` flags, plus device, seed and MLflow."""

from __future__ import annotations

import argparse
from dataclasses import fields

from train.config import AMP_MODES, TrainConfig
from train.losses import LossWeights

_D = TrainConfig()
_W = LossWeights()

# (flag, type, help). Weight help names the paper's term (Mokady et al., ICLR 2020).
WEIGHT_FLAGS = {
    "alpha1": "weight of L_Recon2 for A: the mask decoder, over A itself as background, rebuilds A",
    "alpha2": "weight of L_Recon2 for B: the mask decoder, with a zero separate code over B, rebuilds B",
    "beta1": "weight of L_Cycle, first term: MSE between E_common of A's content put on B and E_common(B)",
    "beta2": "weight of L_Cycle, second term: MSE between E_separate of A's content put on B and E_separate(A)",
    "gama": "weight of L_Recon1 for A: the mask decoder, over D_A([E_common(A), 0]), rebuilds A",
    "delta": "weight of L_Recon1 for B: the decoder D_A([E_common(B), 0]) rebuilds B",
    "discweight": "weight of L_DC, domain confusion: E_common codes of A and B fool the discriminator",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``mask_train.py`` flag, same name, default and meaning; numbers are typed."""
    data = parser.add_argument_group("data and output")
    data.add_argument(
        "--root", default=_D.root, help="data root: trainA/ trainB/ testA/ testB/ folders or trainA.txt ... list files"
    )
    data.add_argument(
        "--out", default=_D.out, help="run folder for the checkpoint, config and grids (default: %(default)s)"
    )
    data.add_argument("--load", default=_D.load, help="resume from the checkpoint in this run folder")
    data.add_argument(
        "--skip-bad",
        dest="skip_bad",
        action="store_true",
        help="leave unreadable or truncated images out (listed on stderr and in OUT/skipped_images.txt) "
        "instead of stopping with an error naming the first one",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--lr", type=float, default=_D.lr, help="Adam learning rate of encoders and decoders (default: %(default)s)"
    )
    opt.add_argument(
        "--disclr", type=float, default=_D.disclr, help="Adam learning rate of the discriminator (default: %(default)s)"
    )
    opt.add_argument("--bs", type=int, default=_D.bs, help="batch size per domain (default: %(default)s)")
    opt.add_argument(
        "--iters", type=int, default=_D.iters, help="training iterations; stops exactly there (default: %(default)s)"
    )
    opt.add_argument(
        "--seed", type=int, default=_D.seed, help="seed of weight init and batch order (default: %(default)s)"
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--resize",
        type=int,
        default=_D.resize,
        help="image side, a multiple of 64 (paper: 64, 128, 256; default: %(default)s)",
    )
    model.add_argument("--sep", type=int, default=_D.sep, help="channels of the separate code (default: %(default)s)")

    weights = parser.add_argument_group("loss weights (reference names; paper terms in each help)")
    for name, text in WEIGHT_FLAGS.items():
        weights.add_argument(f"--{name}", type=float, default=getattr(_W, name), help=f"{text} (default: %(default)s)")

    log = parser.add_argument_group("logging and checkpoints")
    log.add_argument(
        "--progress_iter",
        type=int,
        default=_D.progress_iter,
        help="log mean losses to MLflow and check they are finite every N iterations (default: %(default)s)",
    )
    log.add_argument(
        "--display_iter",
        type=int,
        default=_D.display_iter,
        help="save image grids every N iterations (default: %(default)s)",
    )
    log.add_argument(
        "--save_iter",
        type=int,
        default=_D.save_iter,
        help="write a checkpoint every N iterations (default: %(default)s)",
    )
    log.add_argument(
        "--num_display",
        type=int,
        default=_D.num_display,
        help="images per side of the image grids (default: %(default)s)",
    )

    dev = parser.add_argument_group("device")
    dev.add_argument("--gpu", type=int, default=None, help="CUDA device index to train on (overrides --device)")
    dev.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=_D.amp,
        help="bf16: forward passes under bfloat16 autocast; faster where bf16 matmul is (recent CPUs, "
        "GPUs), losses differ slightly from float32 (default: %(default)s)",
    )
    dev.add_argument("--channels_last", action="store_true", help="NHWC memory layout for the convolutions")
    dev.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the loss computations: minutes of compilation first, then faster steps on GPUs",
    )
    dev.add_argument(
        "--device",
        default=_D.device,
        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    weights = LossWeights(**{f.name: getattr(args, f.name) for f in fields(LossWeights)})
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in ("weights", "eval_every")}
    return TrainConfig(weights=weights, **values)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one model (the reference mask_train.py flags)",
        description="Train the mask-based content transfer model on a two-domain data root. "
        "Logs losses to MLflow (default store: sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI).",
    )
    add_train_arguments(parser)
    parser.add_argument("--experiment", default="mbu-train", help="MLflow experiment of the run (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import mlflow

    from train.loop import train
    from train.tracking import check_tracking_server, resolve_tracking_uri, train_params

    cfg = config_from_args(args)
    check_tracking_server(resolve_tracking_uri())
    mlflow.set_tracking_uri(resolve_tracking_uri())
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=cfg.out):
        mlflow.log_params(train_params(cfg))
        result = train(cfg, progress=not args.no_progress)
    print(f"trained {result.iterations} iterations; checkpoint in {result.run_dir}")
    return 0
