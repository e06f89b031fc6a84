"""Does a model variant learn better or worse? Best-threshold IoU over several seeds, per variant.

    python bench/fidelity.py [--variants paper mbu-0.1] [--seeds 0 1 2] [--iters 500] [--bs 8]

Trains the built-in synthetic benchmark (procedural faces with drawn glasses
and exact masks, 64 px, the main job's data) from scratch for each (variant,
seed) at the same budget, with the published eyewear weights, and scores the
masks of the 200 annotated test A images: ``val/iou_best`` (best threshold on
the validation half) and ``test/iou`` (the other half, at that threshold).
Prints every run, then the mean and sample standard deviation per variant, so
a model change that hurts learning shows up as a number. Seeds fix the
initial weights and the batch order; variants of one seed share both.

Variants (``--variants``, any of):

- ``paper``: the platform's model and defaults: LeakyReLU(0.2) decoders, no
  discriminator gradient clip (what the reference's code ran).
- ``disc-clip``: the same with the discriminator's gradient norm clipped to 5
  (``--disc_clip 5``: what the reference meant to do).
- ``relu-decoders``: ReLU after each decoder BatchNorm instead of LeakyReLU.
- ``mbu-0.1``: the platform before it followed the paper: ReLU decoders and
  the discriminator clip at 5.

Runs on the CPU by default (``--device`` for another); one run of 500
iterations at batch 8 takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbu.data.batches import DomainBatches  # noqa: E402
from mbu.data.images import AnnotatedImages, load_domain  # noqa: E402
from mbu.data.synthetic import SynthConfig, write_dataset  # noqa: E402
from mbu.evaluate.segmentation import load_test_annotations, predict_masks, score_masks  # noqa: E402
from mbu.train.config import TrainConfig  # noqa: E402
from mbu.train.model import ContentTransferModel  # noqa: E402
from mbu.train.step import GRAD_CLIP, Optimizers, build_model, resolve_device, train_step  # noqa: E402


@dataclass(frozen=True)
class Variant:
    relu_decoders: bool = False  # ReLU after each decoder BatchNorm (mbu 0.1) instead of LeakyReLU(0.2)
    disc_clip: float = 0.0  # discriminator gradient-norm clip; 0 = none


VARIANTS = {
    "paper": Variant(),
    "disc-clip": Variant(disc_clip=GRAD_CLIP),
    "relu-decoders": Variant(relu_decoders=True),
    "mbu-0.1": Variant(relu_decoders=True, disc_clip=GRAD_CLIP),
}
DATA = SynthConfig(size=64, n_train=2000, n_test=200, seed=0)  # the main job's data set
DOMAINS = ("trainA", "trainB")


def use_relu_decoders(model: ContentTransferModel) -> None:
    """Swap every LeakyReLU of both decoders for ReLU (weights untouched: they have none)."""
    for decoder in (model.decoder, model.mask_decoder):
        net = decoder.trunk.net
        for index, layer in enumerate(net):
            if isinstance(layer, nn.LeakyReLU):
                net[index] = nn.ReLU(inplace=True)


def train_and_score(
    variant: Variant, seed: int, args: argparse.Namespace, train_images: list[torch.Tensor], annotated: AnnotatedImages
) -> dict[str, float]:
    """Train from scratch at the fixed budget and score the test A masks."""
    cfg = TrainConfig(resize=DATA.size, bs=args.bs, iters=args.iters, seed=seed, disc_clip=variant.disc_clip)
    device = resolve_device(args.device)
    model = build_model(cfg, device)
    if variant.relu_decoders:
        use_relu_decoders(model)
    optimizers = Optimizers.create(model, cfg.lr, cfg.disclr)
    batches = [DomainBatches(images, cfg.bs, seed, domain) for domain, images in enumerate(train_images)]
    model.train()
    for iteration in range(cfg.iters):
        a, b = (domain.batch(iteration) for domain in batches)
        total, _, _ = train_step(model, optimizers, a, b, cfg.weights, disc_clip=cfg.disc_clip)
        if iteration % 100 == 99 and not torch.isfinite(total):
            raise RuntimeError(f"non-finite loss at iteration {iteration + 1}")
    model.eval()
    scores = score_masks(predict_masks(model, annotated.images.to(device)).cpu(), annotated.masks, annotated.names)
    return scores.metrics


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["paper", "mbu-0.1"], help="(default: %(default)s)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=500, help="iterations per run (default: %(default)s)")
    parser.add_argument("--bs", type=int, default=8, help="batch size per domain (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="synthetic data folder (written if absent; default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(DATA, args.data or Path(tmp) / "synthetic", progress=False)
        annotated = load_test_annotations(root, DATA.size, progress=False)
        device = resolve_device(args.device)
        train_images = [load_domain(root, name, DATA.size, progress=False).images.to(device) for name in DOMAINS]
        print(f"synthetic glasses, {DATA.size} px, {args.iters} iterations at batch {args.bs}, {args.device}")
        print(f"{'variant':<14} {'seed':>4} {'val/iou_best':>12} {'test/iou':>9} {'threshold':>9} {'time':>6}")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
        for seed in args.seeds:
            for name in args.variants:
                start = time.monotonic()
                metrics = train_and_score(VARIANTS[name], seed, args, train_images, annotated)
                results[name].append(metrics)
                print(
                    f"{name:<14} {seed:>4} {metrics['val/iou_best']:>12.4f} {metrics['test/iou']:>9.4f} "
                    f"{metrics['val/threshold_best']:>9.2f} {time.monotonic() - start:>5.0f}s",
                    flush=True,
                )

    all_ones = next(iter(results.values()))[0]["baseline/iou_all_ones"]
    print(f"\nmean ± sd over {len(args.seeds)} seeds (all-ones mask: test IoU {all_ones:.4f})")
    print(f"{'variant':<14} {'val/iou_best':>16} {'test/iou':>16}")
    for name, runs in results.items():
        val = spread([m["val/iou_best"] for m in runs])
        test = spread([m["test/iou"] for m in runs])
        print(f"{name:<14} {val:>16} {test:>16}")


if __name__ == "__main__":
    main()
