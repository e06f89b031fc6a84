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

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from mbu.train.model import ContentTransferModel, composite


def _weight(default: float, term: str, paper_term: str, help: str) -> float:
    """A loss weight: the term it scales (a key of the terms dict), the paper's name of it, what the term asks."""
    return field(default=default, metadata={"term": term, "paper_term": paper_term, "help": help})


@dataclass(frozen=True)
class LossWeights:
    """The seven loss weights: field names are the reference's flags, each declared with the term it scales.

    Adding a term: a field here, its computation in :func:`autoencoder_losses` (and in
    ``train/reference.py``, the slow baseline the tests compare with); flags, study keys and the
    term-to-weight map follow from the field.
    """

    alpha1: float = _weight(
        0.7, "recon2_a", "L_Recon2 for A", "the mask decoder, over A itself as background, rebuilds A"
    )
    alpha2: float = _weight(
        0.7, "recon2_b", "L_Recon2 for B", "the mask decoder, with a zero separate code over B, rebuilds B"
    )
    beta1: float = _weight(
        0.0,
        "cycle_common",
        "L_Cycle, first term",
        "MSE between E_common of A's content put on B and E_common(B)",
    )
    beta2: float = _weight(
        0.001,
        "cycle_separate",
        "L_Cycle, second term",
        "MSE between E_separate of A's content put on B and E_separate(A)",
    )
    gama: float = _weight(7.0, "recon1_a", "L_Recon1 for A", "the mask decoder, over D_A([E_common(A), 0]), rebuilds A")
    delta: float = _weight(5.0, "recon1_b", "L_Recon1 for B", "the decoder D_A([E_common(B), 0]) rebuilds B")
    discweight: float = _weight(
        0.005, "domain_confusion", "L_DC, domain confusion", "E_common codes of A and B fool the discriminator"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss weight {f.name} must be >= 0, got {value}")
        if not any(getattr(self, name) for name in TERM_WEIGHTS.values()):
            raise ValueError("at least one loss weight must be positive")


# Term name -> the weight that scales it.
TERM_WEIGHTS = {f.metadata["term"]: f.name for f in fields(LossWeights)}


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
