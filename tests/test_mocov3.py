import torch

from fastvit_ssl.config import load
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.losses import contrastive_loss_ref
from fastvit_ssl.methods.mocov3 import MoCoV3
from fastvit_ssl.optim.schedules import Hyperparameters

TINY = ["model.arch=vit_demo", "model.img_size=14", "moco.dim=16", "moco.mlp_dim=32"]


def tiny_model():
    torch.manual_seed(0)
    return MoCoV3.build(load(None, TINY), REFERENCE_OPS)


def test_loss_is_the_symmetric_contrastive_loss_of_the_paper():
    model = tiny_model().double()  # fp64: the comparison is of formulas, not of fp32 summation orders
    x1, x2 = torch.randn(2, 6, 3, 14, 14, dtype=torch.float64)
    reference = tiny_model().double()  # same weights; run the official per-view computation by hand
    loss = model.step_losses([x1, x2], step=0, hparams=Hyperparameters(0.0, 0.0, 0.99))["loss"]
    q1 = reference.online.predictor(reference.online.base_projector(reference.online.base_encoder(x1)))
    q2 = reference.online.predictor(reference.online.base_projector(reference.online.base_encoder(x2)))
    with torch.no_grad():
        reference.update_ema(0.99)
        k1 = reference.momentum_projector(reference.momentum_encoder(x1))
        k2 = reference.momentum_projector(reference.momentum_encoder(x2))
    expected = contrastive_loss_ref(q1, k2, 0.2) + contrastive_loss_ref(q2, k1, 0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)  # roundoff 1.1e-16 through ~100 ops


def test_one_pass_for_both_views_equals_one_pass_per_view():
    """In float64: the same losses, gradients and BN running statistics (the heads' BN sees each view on its own,
    its running statistics move once per view, in the views' order)."""
    x1, x2 = torch.randn(2, 6, 3, 14, 14, dtype=torch.float64)
    runs = []
    for one_pass in (True, False):
        model = tiny_model().double()
        model.encode_views_in_one_pass(one_pass)
        loss = model.step_losses([x1, x2], step=0, hparams=Hyperparameters(0.0, 0.0, 0.99))["loss"]
        loss.backward()
        grads = [p.grad for p in model.online.parameters() if p.grad is not None]
        runs.append((loss, grads, [b for name, b in model.named_buffers() if "running" in name]))
    (loss, grads, stats), (loss2, grads2, stats2) = runs
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=0)  # fp64 roundoff through ~100 ops: < 1e-14
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * max(g.abs().max() for g in grads2).item())
    assert len(stats) == 2 * (3 + 2 + 3)  # mean and variance of the projector's, predictor's, momentum projector's BN
    for a, b in zip(stats, stats2, strict=True):  # of O(1) activations (some of zero mean): roundoff ~1e-16
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_momentum_encoder_starts_equal_gets_no_gradient_and_follows_the_ema():
    model = tiny_model()
    for b, m in zip(model.online.base_encoder.parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(b, m) and not m.requires_grad
    model.step_losses(list(torch.randn(2, 4, 3, 14, 14)), step=0, hparams=Hyperparameters(0.0, 0.0, 0.9))[
        "loss"
    ].backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is None for p in model.momentum_projector.parameters())
    with torch.no_grad():
        for p in model.online.base_encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model.update_ema(0.9)
    for b, m, old in zip(model.online.base_encoder.parameters(), model.momentum_encoder.parameters(), before):
        torch.testing.assert_close(m, 0.9 * old + 0.1 * b if b.requires_grad else old)  # fp32, 2 roundings


def test_frozen_patch_projection_stays_identical_in_both_encoders():
    model = tiny_model()
    assert model.online.base_encoder.patch_embed.proj.weight.grad is None
    model.update_ema(0.5)
    assert torch.equal(
        model.online.base_encoder.patch_embed.proj.weight, model.momentum_encoder.patch_embed.proj.weight
    )
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert not any(name.startswith("online.base_encoder.patch_embed") for name in trained)
    assert any(name.startswith("online.base_encoder.blocks") for name in trained)
