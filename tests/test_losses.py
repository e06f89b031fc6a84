"""Each loss term against a hand computation, and the fast step against the reference's two-pass step."""

from __future__ import annotations

import pytest
import torch

from mbu.train.losses import LossWeights, autoencoder_losses, discriminator_loss
from mbu.train.model import ContentTransferModel, ModelConfig
from mbu.train.reference import reference_autoencoder_losses, reference_discriminator_loss


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = ContentTransferModel(ModelConfig(resize=64, sep=25))
    a = torch.rand(3, 3, 64, 64) * 2 - 1
    b = torch.rand(3, 3, 64, 64) * 2 - 1
    return model, a, b


def _hand_terms(model, a, b):
    """The loss table (``train/losses.py``) written out with explicit arithmetic (mean |x|, mean x^2, -log)."""
    ec_a, es_a, ec_b = model.e_common(a), model.e_separate(a), model.e_common(b)
    zeros = torch.zeros(len(a), 25)

    def md(common, separate, background):
        mask, content = model.mask_decoder.layers(torch.cat([common, separate], 1))
        return mask * content + (1 - mask) * background

    def dec(common, separate):
        return model.decoder(torch.cat([common, separate], 1))

    c = md(ec_b, es_a, b)
    p_a, p_b = model.disc(ec_a), model.disc(ec_b)
    return {
        "recon1_a": (md(ec_a, es_a, dec(ec_a, zeros)) - a).abs().mean(),
        "recon1_b": (dec(ec_b, zeros) - b).abs().mean(),
        "recon2_a": (md(ec_a, es_a, a) - a).abs().mean(),
        "recon2_b": (md(ec_b, zeros, b) - b).abs().mean(),
        "cycle_common": ((model.e_common(c) - ec_b) ** 2).mean(),
        "cycle_separate": ((model.e_separate(c) - es_a) ** 2).mean(),
        "domain_confusion": -torch.log(1 - p_a).mean() - torch.log(1 - p_b).mean(),
    }


def test_each_term_matches_hand_computation(setup) -> None:
    model, a, b = setup
    model.eval()  # fixed BatchNorm statistics: every forward pass computes the same function
    weights = LossWeights(alpha1=0.3, alpha2=0.4, beta1=0.5, beta2=0.6, gama=0.7, delta=0.8, discweight=0.9)
    with torch.no_grad():
        total, terms = autoencoder_losses(model, a, b, weights)
        hand = _hand_terms(model, a, b)
    assert set(terms) == set(hand)
    for name, value in hand.items():
        assert torch.allclose(terms[name], value, rtol=1e-5, atol=1e-7), name
    expected = sum(
        getattr(weights, w) * hand[t]
        for t, w in [
            ("recon1_a", "gama"),
            ("recon1_b", "delta"),
            ("recon2_a", "alpha1"),
            ("recon2_b", "alpha2"),
            ("cycle_common", "beta1"),
            ("cycle_separate", "beta2"),
            ("domain_confusion", "discweight"),
        ]
    )
    assert torch.allclose(total, expected, rtol=1e-5)


def test_zero_weight_terms_are_skipped(setup) -> None:
    model, a, b = setup
    _, terms = autoencoder_losses(model, a, b, LossWeights(beta1=0.0, discweight=0.0))
    assert "cycle_common" not in terms and "domain_confusion" not in terms
    assert "cycle_separate" in terms


def test_fast_step_matches_reference_losses_and_gradients(setup) -> None:
    """One trunk pass and skipped zero terms give the reference's losses and gradients."""
    model, a, b = setup
    weights = LossWeights()  # beta1 = 0, as in every published preset
    grads = []
    for fn in (reference_autoencoder_losses, autoencoder_losses):
        model.zero_grad()
        total, terms = fn(model, a, b, weights)
        total.backward()
        grads.append([p.grad.clone() for p in model.autoencoder_parameters()])
        if fn is reference_autoencoder_losses:
            ref_total, ref_terms = total.detach(), {k: v.detach() for k, v in terms.items()}
    assert torch.allclose(total, ref_total, rtol=1e-6)
    for name, value in terms.items():
        assert torch.allclose(value, ref_terms[name], rtol=1e-6), name
    # Float rounding is relative to the largest gradient, not to each entry: a bias before a BatchNorm
    # has a gradient of exactly zero in theory, rounding noise in practice, and that noise (like the
    # order of every sum) changes with the number of threads.
    atol = 1e-6 * max(g.abs().max().item() for g in grads[0])
    for g_ref, g_fast in zip(*grads, strict=True):
        assert torch.allclose(g_ref, g_fast, rtol=1e-4, atol=atol)


def test_discriminator_loss_matches_reference(setup) -> None:
    model, a, b = setup
    grads = []
    for fn in (reference_discriminator_loss, discriminator_loss):
        model.zero_grad()
        loss = fn(model, a, b)
        loss.backward()
        grads.append([p.grad.clone() for p in model.disc.parameters()])
    for g_ref, g_fast in zip(*grads, strict=True):
        assert torch.allclose(g_ref, g_fast, rtol=1e-4, atol=1e-6)  # BCE written out: float rounding only


def test_negative_or_all_zero_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="gama"):
        LossWeights(gama=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        LossWeights(alpha1=0, alpha2=0, beta1=0, beta2=0, gama=0, delta=0, discweight=0)
