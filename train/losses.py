"""The seven weighted loss terms and the discriminator loss of one training iteration.

With a = A batch, b = B batch, Ec/Es the common/separate encoders, D_A the
decoder, M the mask decoder (code, background) and 0 a zero separate code:

- recon1_a (``gama``): L1(M([Ec(a), Es(a)], bg = D_A([Ec(a), 0])), a)
- recon1_b (``delta``): L1(D_A([Ec(b), 0]), b)
- recon2_a (``alpha1``): L1(M([Ec(a), Es(a)], bg = a), a)
- recon2_b (``alpha2``): L1(M([Ec(b), 0], bg = b), b)
- cycle (``beta1``, ``beta2``): c = M([Ec(b), Es(a)], bg = b);
  MSE(Ec(c), Ec(b)) and MSE(Es(c), Es(a))
- domain_confusion (``discweight``): BCE(disc(Ec(a)), 0) + BCE(disc(Ec(b)), 0)

and the discriminator's own loss BCE(disc(Ec(a)), 1) + BCE(disc(Ec(b)), 0).

The computation is the reference's with its free work removed: the mask
decoder's trunk runs once for ``[Ec(a), Es(a)]`` (only the background differs
between Recon1-A and Recon2-A), and a term whose weight is 0 is not computed.
Losses and gradients equal the reference's two-pass computation up to float
rounding (``train/reference.py``, tested).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from mbu.train.model import ContentTransferModel, composite


@dataclass(frozen=True)
class LossWeights:
    """Flag names are the reference's; the paper's term is in each comment."""

    alpha1: float = 0.7  # L_Recon2 of A: mask decoder over A itself rebuilds A
    alpha2: float = 0.7  # L_Recon2 of B: mask decoder (zero separate) over B rebuilds B
    beta1: float = 0.0  # L_Cycle, first term: common code survives a transfer
    beta2: float = 0.001  # L_Cycle, second term: separate code survives a transfer
    gama: float = 7.0  # L_Recon1 of A: mask decoder over D_A(common, 0) rebuilds A
    delta: float = 5.0  # L_Recon1 of B: decoder D_A(common, 0) rebuilds B
    discweight: float = 0.005  # L_DC: common codes fool the domain discriminator

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss weight {f.name} must be >= 0, got {value}")
        if not any(getattr(self, name) for name in TERM_WEIGHTS.values()):
            raise ValueError("at least one loss weight must be positive")


# Term name -> the weight that scales it.
TERM_WEIGHTS = {
    "recon1_a": "gama",
    "recon1_b": "delta",
    "recon2_a": "alpha1",
    "recon2_b": "alpha2",
    "cycle_common": "beta1",
    "cycle_separate": "beta2",
    "domain_confusion": "discweight",
}


def _bce(prob: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy against a constant float label.

    PyTorch's formula (logs clamped at -100), written out so a NaN probability
    yields a NaN loss that the loop reports, where ``F.binary_cross_entropy``
    raises. Float labels: the reference's integer labels crash on current PyTorch.
    """
    log_p = torch.log(prob).clamp(min=-100)
    log_not_p = torch.log1p(-prob).clamp(min=-100)
    return -(target * log_p + (1 - target) * log_not_p).mean()


def autoencoder_losses(
    model: ContentTransferModel, a: torch.Tensor, b: torch.Tensor, w: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and the unweighted terms (skipped terms are absent).

    a: (N, 3, H, W) batch of domain A in [-1, 1]; b: the same for domain B.
    """
    a_common, a_separate = model.e_common(a), model.e_separate(a)  # (N, Dc), (N, Ds)
    b_common = model.e_common(b)
    zero = model.zero_separate(len(b), b_common)
    terms: dict[str, torch.Tensor] = {}

    if w.delta:
        terms["recon1_b"] = F.l1_loss(model.decoder(model.code(b_common, zero)), b)

    # One trunk pass serves both A reconstructions.
    a_mask, a_content = model.mask_decoder.layers(model.code(a_common, a_separate))
    if w.gama:
        # Background: the content-free decoding D_A([Ec(a), 0]).
        a_free = model.decoder(model.code(a_common, model.zero_separate(len(a), a_common)))
        terms["recon1_a"] = F.l1_loss(composite(a_mask, a_content, a_free), a)
    if w.alpha1:
        terms["recon2_a"] = F.l1_loss(composite(a_mask, a_content, a), a)
    if w.alpha2:
        b_rebuilt, _ = model.mask_decoder(model.code(b_common, zero), b)
        terms["recon2_b"] = F.l1_loss(b_rebuilt, b)

    # Cycle: A's content on B, then encode the result again.
    if w.beta1 or w.beta2:
        b_with_a, _ = model.mask_decoder(model.code(b_common, a_separate), b)
        if w.beta1:
            terms["cycle_common"] = F.mse_loss(model.e_common(b_with_a), b_common)
        if w.beta2:
            terms["cycle_separate"] = F.mse_loss(model.e_separate(b_with_a), a_separate)

    if w.discweight:
        terms["domain_confusion"] = _bce(model.disc(a_common), 0.0) + _bce(model.disc(b_common), 0.0)

    total = sum(getattr(w, TERM_WEIGHTS[name]) * value for name, value in terms.items())
    return total, terms


def discriminator_loss(model: ContentTransferModel, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BCE(disc(Ec(a)), 1) + BCE(disc(Ec(b)), 0) with the common codes recomputed.

    The encoder runs without a graph: the reference back-propagated into it, but
    the next ``zero_grad`` discarded those gradients.
    """
    with torch.no_grad():
        a_common, b_common = model.e_common(a), model.e_common(b)
    return _bce(model.disc(a_common), 1.0) + _bce(model.disc(b_common), 0.0)
