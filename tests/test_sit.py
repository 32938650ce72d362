"""SiT on the method interface: the loss against a plain float64 re-derivation of the formula, who sees what and
who gets gradients, the teacher's EMA, parameter groups and the recipe's options."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_ssl.config import load
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.optim.schedules import Hyperparameters

TINY = [
    "method.name=sit",
    "model.arch=vit_demo",
    "model.img_size=14",
    "model.pos_embed=learned",
    "model.init=trunc_normal",
    "model.frozen_patch_embed=false",
    "sit.dim=16",
    "sit.mlp_dim=32",
]


def tiny_sit(*extra):
    torch.manual_seed(0)
    return build_method(load(None, [*TINY, *extra]), REFERENCE_OPS)


def views(n=6, seed=1):
    return list(torch.randn(2, n, 3, 14, 14, generator=torch.Generator().manual_seed(seed)))


def test_loss_equals_the_formula_in_float64():
    model = tiny_sit("sit.recon_weight=2.5", "sit.drop_path=0").double()  # no random drop path to redo by hand
    x = [v.double() for v in views()]
    batch = model.prepare(x, step=3)
    losses = model.step_losses(x, step=3, hparams=Hyperparameters(0.0, 0.0, 0.996))
    # by hand: student on the corrupted views, teacher on the clean ones, InfoNCE x 2 tau, L1 on corrupted pixels
    tokens = model.online.encoder.forward_tokens(batch["corrupted"])
    s1, s2 = model.online.head(tokens[:, 0]).chunk(2)
    recon = model.online.recon_head(tokens[:, 1:])
    t1, t2 = model.teacher_head(model.teacher_encoder(batch["clean"])).chunk(2)

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        return F.cross_entropy(logits, torch.arange(len(q))) * 2 * 0.2

    pixels = batch["mask"][:, None].expand_as(recon)
    rec = (recon - batch["clean"]).abs()[pixels].mean()
    # fp64 (roundoff 1.1e-16) through ~100 ops of a loss of size ~3: 1e-10 leaves six orders for cancellations
    torch.testing.assert_close(losses["loss/contrastive"], ctr(s1, t2) + ctr(s2, t1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses["loss/reconstruction"], rec, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses["loss"], ctr(s1, t2) + ctr(s2, t1) + 2.5 * rec, rtol=1e-10, atol=1e-12)


def test_teacher_sees_clean_views_gets_no_gradient_and_the_student_sees_corrupted_ones():
    model = tiny_sit()
    seen = {}
    model.teacher_encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(teacher=args[0]))
    model.online.encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(student=args[0]))
    x = views()
    model.step_losses(x, step=0, hparams=Hyperparameters(0.0, 0.0, 0.996))["loss"].backward()
    batch = model.prepare(x, step=0)
    assert torch.equal(seen["teacher"], torch.cat(x)) and torch.equal(seen["student"], batch["corrupted"])
    assert not torch.equal(batch["corrupted"], batch["clean"])
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if n.startswith("teacher"))
    assert all(p.grad is not None for p in model.online.parameters())  # patch projection and positions train too


def test_teacher_is_the_ema_of_encoder_and_head_without_drop_path():
    model = tiny_sit()
    assert [b.drop_path_rate for b in model.online.encoder.blocks][-1] == pytest.approx(0.1)
    assert all(b.drop_path_rate == 0 for b in model.teacher_encoder.blocks)
    pairs = model.ema_pairs()
    assert len(pairs) == len(list(model.online.encoder.parameters())) + len(list(model.online.head.parameters()))
    with torch.no_grad():
        for p, _ in pairs:
            p.add_(1.0)
    before = [e.clone() for _, e in pairs]
    model.update_ema(0.9)
    for (p, e), old in zip(pairs, before):
        torch.testing.assert_close(e, 0.9 * old + 0.1 * p)  # fp32, two roundings


def test_biases_and_1d_tensors_get_no_weight_decay():
    model = tiny_sit()
    decay, plain = model.param_groups()
    assert (decay["wd_scale"], plain["wd_scale"]) == (1.0, 0.0)
    names = {id(p): n for n, p in model.online.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.online.parameters()))


def test_uint8_views_are_normalised_before_corruption():
    model = tiny_sit()
    u = [torch.randint(0, 256, (4, 14, 14, 3), dtype=torch.uint8) for _ in range(2)]
    batch = model.prepare(u, step=0)
    assert batch["clean"].dtype == torch.float32 and batch["clean"].shape == (8, 3, 14, 14)
    assert torch.isfinite(model.step_losses(u, step=0, hparams=Hyperparameters(0.0, 0.0, 0.996))["loss"])
