"""The local engine's gradient bookkeeping: every norm from one multi-tensor pass, clipping as torch and DINO/SiT
clip, and fp16 with dynamic loss scaling (an overflow is skipped, counted, and not a diverging run)."""

from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl.config import load
from fastvit_ssl.engine.local import GradientNorms, LocalEngine, layer_groups
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.schedules import Hyperparameters

TINY = ["model.arch=vit_demo", "model.img_size=14", "moco.dim=16", "moco.mlp_dim=32"]


def method_with_gradients(seed: int = 0):
    """A tiny MoCo v3 in float64 (norms compared with formulas, not summation orders) after one backward."""
    torch.manual_seed(seed)
    model = build_method(load(None, TINY), REFERENCE_OPS).double()
    views = list(torch.randn(2, 4, 3, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    model.step_losses(views, step=0, hparams=Hyperparameters(0.0, 0.0, 0.99))["loss"].backward()
    params = [p for p in model.online.parameters() if p.requires_grad]
    return model, params


def test_norms_are_the_global_and_per_layer_norms_and_no_clip_leaves_gradients():
    model, params = method_with_gradients()
    before = [p.grad.clone() for p in params]
    total, layers = GradientNorms(model, params)(0.0, "global")
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])))
    for name, group in layer_groups(model).items():  # fp64: default tolerance (1e-7)
        expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in group]))
        torch.testing.assert_close(layers[name].double(), expected, msg=name)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_global_clipping_is_torchs():
    model, params = method_with_gradients()
    theirs = [p.grad.clone().requires_grad_(False) for p in params]
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for s, g in zip(shadow, theirs):
        s.grad = g
    norm = torch.nn.utils.clip_grad_norm_(shadow, 0.5)
    total, _ = GradientNorms(model, params)(0.5, "global")
    torch.testing.assert_close(total, norm)
    for p, s in zip(params, shadow):
        torch.testing.assert_close(p.grad, s.grad)


def test_per_tensor_clipping_scales_each_large_tensor_on_its_own():
    model, params = method_with_gradients()
    before = [p.grad.clone() for p in params]
    GradientNorms(model, params)(0.05, "per_tensor")
    for p, g in zip(params, before):
        norm = g.norm()
        expected = g * (0.05 / (norm + 1e-6)) if norm > 0.05 else g
        torch.testing.assert_close(p.grad, expected)
    assert any(g.norm() > 0.05 for g in before) and any(g.norm() < 0.05 for g in before)  # both cases ran


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch without torch.amp.GradScaler")
def test_fp16_overflow_skips_the_update_halves_the_scale_and_is_not_a_bad_step():
    """On CPU autocast takes fp16 too; an infinite gradient stands for an overflow of the scaled loss."""
    torch.manual_seed(0)
    model = build_method(load(None, TINY), REFERENCE_OPS)
    engine = LocalEngine(
        model, build_optimizer(load(None, TINY).optim, model.param_groups()), torch.device("cpu"), "fp16"
    )
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # 2^16 overflows this model's first steps
    views = list(torch.randn(2, 4, 3, 14, 14))
    hp = Hyperparameters(1e-3, 0.1, 0.99)
    metrics, finite = engine.step(views, 0, hp)
    assert finite and engine.overflows == 0 and metrics["loss_scale"] == 2.0**8
    weights = [p.detach().clone() for p in engine.params]
    hook = engine.params[0].register_hook(lambda g: g * float("inf"))
    metrics, finite = engine.step(views, 1, hp)
    hook.remove()
    assert finite and engine.overflows == 1  # counted, and not a non-finite step for the guard
    assert all(torch.equal(p, w) for p, w in zip(engine.params, weights))  # no update
    assert engine.scaler.get_scale() == 2.0**7


def test_fp16_runs_resume_exactly_with_the_loss_scaler(tiny_overrides):
    """The scaler's state is in the checkpoint: stopped at step 4 and resumed, the same losses and scales."""
    fp16 = [*tiny_overrides, "run.precision=fp16", "eval.knn_every_epochs=0"]
    full = train.main([*fp16, "run.name=full"])
    rows = [r for r in read_metrics(Path(full["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert full["steps"] == 6 and all("loss_scale" in r for r in rows)
    assert train.main([*fp16, "run.name=cut", "run.stop_at_step=4"])["steps"] == 4
    resumed = train.main([*fp16, "run.name=cut"])
    again = [r for r in read_metrics(Path(resumed["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert [(r["loss"], r["loss_scale"]) for r in again] == [(r["loss"], r["loss_scale"]) for r in rows]
