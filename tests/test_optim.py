import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastvit_ssl.config import OptimConfig, load
from fastvit_ssl.methods.base import method_class
from fastvit_ssl.optim import schedules
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS
from fastvit_ssl.optim.schedules import Hyperparameters, set_hyperparameters

REPO = Path(__file__).resolve().parents[1]

# Schedules are Python floats (fp64): pytest.approx's default (1e-6 relative) is far above their rounding. The
# optimizers keep fp32 state and compute in fp32 whatever the parameters' dtype: 3 steps on values of size ~1 stay
# within a few fp32 ulps (1.2e-7 each) of the fp64 formula, hence rtol 1e-6.


def test_learning_rate_schedule():
    lr = [schedules.learning_rate(e, 1.0, 10, 100) for e in (0, 5, 10, 55, 100)]
    assert lr == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)
    curve = [schedules.learning_rate(e / 10, 1.0, 10, 100) for e in range(100, 1001)]
    assert all(a >= b for a, b in zip(curve, curve[1:]))  # non-increasing after warm-up
    assert schedules.peak_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3)


def configured(method: str, *overrides: str):
    """The method's demo config with `overrides` (valid for that method)."""
    demo = {"mocov3": "demo.yaml", "sit": "sit_demo.yaml", "beit": "beit_demo.yaml"}[method]
    return load(REPO / "configs" / demo, list(overrides))


def test_schedules_follow_the_sit_recipe():
    cfg = configured(
        "sit",
        *("optim.epochs=100", "optim.warmup_epochs=10", "optim.min_lr=1e-6", "optim.base_lr=5e-4"),
        *("optim.weight_decay=0.04", "optim.weight_decay_end=0.1", "sit.momentum=0.996", "data.batch_size=256"),
    )
    spe = 10
    s = schedules.Schedules(cfg, method_class("sit"), spe)
    start, middle, last = s.at(0), s.at(50 * spe), s.at(100 * spe - 1)
    assert (start.lr, start.weight_decay, start.momentum) == (0.0, pytest.approx(0.04), 0.996)
    assert middle.weight_decay == pytest.approx(0.07)  # half-way along the cosine
    # one iteration before the end: lr = 1e-6 + 2.5e-4 (1 - cos(pi 0.1 / 90)) = 1e-6 + 1.5e-9 (0.15% above its
    # end), weight decay = 0.1 - 0.03 (1 - cos(pi 0.1 / 100)) = 0.1 - 1.5e-7
    assert last.lr == pytest.approx(1e-6, rel=1e-2) and last.weight_decay == pytest.approx(0.1, rel=1e-5)
    assert s.at(50 * spe, lr_scale=0.5).lr == pytest.approx(middle.lr / 2)
    assert s.at(10**6) == last  # past the end: the last values
    assert set(start.values) == {"lr", "weight_decay", "momentum"}
    constant = schedules.Schedules(configured("sit", "optim.weight_decay=0.1"), method_class("sit"), spe)
    assert set(constant.weight_decay) == {0.1}


@pytest.mark.parametrize("cosine", [True, False])
def test_momentum_schedule_is_the_papers(cosine):
    """m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2 per iteration (MoCo v3's adjust_moco_momentum), or constant."""
    cfg = configured("mocov3", "moco.momentum=0.99", f"moco.momentum_cosine={str(cosine).lower()}")
    momentum = method_class("mocov3").schedules(cfg, 300)["momentum"]
    t = np.arange(300)
    expected = 1 - 0.01 * (1 + np.cos(np.pi * t / 300)) / 2 if cosine else np.full(300, 0.99)
    np.testing.assert_allclose(momentum, expected, rtol=1e-15)  # fp64 both, the same formula
    assert momentum[0] == pytest.approx(0.99) and momentum[150] == pytest.approx(0.995 if cosine else 0.99)


def make_params():
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=g))
    bias = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=g))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # ||p|| = 0: trust ratio falls back to 1
    grads = [[torch.randn(p.shape, dtype=torch.float64, generator=g) for p in (weight, bias, zero)] for _ in range(3)]
    return [weight, bias, zero], grads


def test_lars_matches_moco_v3_rule():
    params, grads = make_params()
    expected = [p.detach().clone() for p in params]
    mu = [torch.zeros_like(p) for p in params]
    lr, wd, momentum, eta = 0.1, 0.01, 0.9, 0.001
    opt = LARS(params, lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=eta)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(expected, step_grads)):
            u = g.clone()
            if p.ndim > 1:
                u = u + wd * p
                ratio = eta * p.norm() / u.norm() if p.norm() > 0 and u.norm() > 0 else 1.0
                u = u * ratio
            mu[i] = momentum * mu[i] + u
            expected[i] = p - lr * mu[i]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-9)


def test_lamb_matches_the_paper_with_bias_correction():
    params, grads = make_params()
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-6, 0.1
    opt = LAMB(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for t, step_grads in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(expected, step_grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            ratio = 1.0
            if p.ndim > 1:
                u = u + wd * p
                ratio = p.norm() / u.norm() if p.norm() > 0 and u.norm() > 0 else 1.0
            expected[i] = p - lr * ratio * u
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("optimizer", [LARS, LAMB])
def test_bf16_parameters_keep_fp32_state(optimizer):
    p = nn.Parameter(torch.randn(3, 3).bfloat16())
    p.grad = torch.randn(3, 3).bfloat16()
    opt = optimizer([p], lr=0.1)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in opt.state[p].values() if s.ndim)


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("lars", LARS), ("lamb", LAMB)])
def test_build_optimizer_decays_only_the_groups_that_say_so(name, kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = [
        {"params": [model[0].weight, model[1].weight], "lr_scale": 1.0, "wd_scale": 1.0},
        {"params": [model[1].bias], "lr_scale": 0.5, "wd_scale": 0.0},
    ]
    opt = build_optimizer(
        OptimConfig(name=name, weight_decay=0.3), groups + [{"params": [], "lr_scale": 1.0, "wd_scale": 1.0}]
    )
    assert isinstance(opt, kind)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]  # the empty group is dropped
    assert [p for g in opt.param_groups for p in g["params"]] == [model[0].weight, model[1].weight, model[1].bias]
    assert opt.param_groups[0]["lr"] == 0.0
    set_hyperparameters(opt, Hyperparameters(lr=0.5, weight_decay=0.05, momentum=1.0))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.05), (0.25, 0.0)]


def official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs):
    """DINO's, SiT's and BEiT's utils.cosine_scheduler, re-derived: np.linspace(0, base, W) over the warm-up
    iterations, then base -> final on a half-cosine over the rest, one value per iteration."""
    warmup = list(np.linspace(0, base, warmup_epochs * niter_per_ep)) if warmup_epochs else []
    rest = epochs * niter_per_ep - len(warmup)
    return warmup + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)]


def official_moco_lr(base, epoch, warmup_epochs, epochs):
    """moco-v3's main_moco.py adjust_learning_rate at a fractional epoch."""
    if epoch < warmup_epochs:
        return base * epoch / warmup_epochs
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("method", ["mocov3", "sit", "beit"])
def test_each_method_has_its_official_learning_rate_schedule_index_by_index(method):
    """SiT and BEiT reach the peak at warm-up iteration W - 1, MoCo v3 at W."""
    epochs, warmup, spe, peak, floor = 5, 2, 7, 0.3, 1e-3
    floor = 0.0 if method == "mocov3" else floor
    limits = (f"optim.epochs={epochs}", f"optim.warmup_epochs={warmup}", f"optim.min_lr={floor}")
    cfg = configured(method, *limits, f"optim.base_lr={peak}", "data.batch_size=256")  # peak lr = base_lr
    kind = method_class(method).lr_warmup
    ours = list(schedules.Schedules(cfg, method_class(method), spe).lr)
    if method == "mocov3":
        theirs = [official_moco_lr(peak, i / spe, warmup, epochs) for i in range(epochs * spe)]
    else:
        theirs = official_cosine_scheduler(peak, floor, epochs, spe, warmup)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)  # fp64 both: the same formula, index by index
    first_peak = ours.index(max(ours))
    assert first_peak == (warmup * spe - 1 if kind == "linspace" else warmup * spe)
