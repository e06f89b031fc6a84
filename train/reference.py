"""The reference code's loss computation, done the way ``mask_train.py`` does it.

Kept as a baseline: tests check that the platform's faster loss functions give
the same losses and gradients, and ``bench/train_step.py`` times it. It runs on
the project's own model, so it proves the fast path equals the slow path, not
that the model is the paper's: ``tests/test_network_layers.py`` checks that
against an independent layer table. Integer BCE labels, which crash on current
PyTorch, are floats here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mbu.train.losses import TERM_WEIGHTS, LossWeights
from mbu.train.model import ContentTransferModel


def reference_autoencoder_losses(
    model: ContentTransferModel, a: torch.Tensor, b: torch.Tensor, w: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every term computed (zero weights included), the mask trunk run twice for A."""
    a_common, a_separate = model.e_common(a), model.e_separate(a)
    b_common = model.e_common(b)
    zero_a = model.zero_separate(len(a), a_common)
    zero_b = model.zero_separate(len(b), b_common)
    a_code = model.code(a_common, a_separate)

    a_free = model.decoder(model.code(a_common, zero_a))
    b_free = model.decoder(model.code(b_common, zero_b))
    a_rebuilt1, _ = model.mask_decoder(a_code, a_free)
    a_rebuilt2, _ = model.mask_decoder(a_code, a)
    b_rebuilt2, _ = model.mask_decoder(model.code(b_common, zero_b), b)
    b_with_a, _ = model.mask_decoder(model.code(b_common, a_separate), b)
    zeros_a = torch.zeros(len(a), 1, device=a.device)
    zeros_b = torch.zeros(len(b), 1, device=b.device)
    terms = {
        "recon1_a": F.l1_loss(a_rebuilt1, a),
        "recon1_b": F.l1_loss(b_free, b),
        "recon2_a": F.l1_loss(a_rebuilt2, a),
        "recon2_b": F.l1_loss(b_rebuilt2, b),
        "cycle_common": F.mse_loss(model.e_common(b_with_a), b_common),
        "cycle_separate": F.mse_loss(model.e_separate(b_with_a), a_separate),
        "domain_confusion": F.binary_cross_entropy(model.disc(a_common), zeros_a)
        + F.binary_cross_entropy(model.disc(b_common), zeros_b),
    }
    total = sum(getattr(w, TERM_WEIGHTS[name]) * value for name, value in terms.items())
    return total, terms


def reference_discriminator_loss(model: ContentTransferModel, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Common codes recomputed with a graph into the encoder, as the reference did."""
    a_common, b_common = model.e_common(a), model.e_common(b)
    pred_a, pred_b = model.disc(a_common), model.disc(b_common)
    return F.binary_cross_entropy(pred_a, torch.ones_like(pred_a)) + F.binary_cross_entropy(
        pred_b, torch.zeros_like(pred_b)
    )
