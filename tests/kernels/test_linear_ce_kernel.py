"""The fused LM head (kernels/linear_ce.py) against its reference: fresh random inputs at odd shapes, fp32 against
float64 and bf16 against PyTorch's own bf16 error, loss and the gradients of x, W and b, ignored rows, chunks."""

import pytest
import torch

from fastvit_ssl.kernels import linear_ce
from fastvit_ssl.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_ref
from numerics import assert_no_worse_than_torch


def problem(n, d, v, dtype, seed, ignored=0.25, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    return [a.to(device, dtype) for a in (x, w, b)] + [t.to(device)]


def loss_and_grads(fn, x, w, b, t):
    x, w, b = (a.detach().clone().requires_grad_() for a in (x, w, b))
    loss = fn(x, w, b, t)
    loss.backward()
    return loss.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("n, d, v", [(37, 24, 1000), (5, 16, 8192), (64, 40, 301)])
def test_fp32_matches_the_float64_reference(device, n, d, v):
    x, w, b, t = problem(n, d, v, torch.float32, seed=n + v, device=device)
    ours = loss_and_grads(linear_cross_entropy, x, w, b, t)
    exact = loss_and_grads(linear_cross_entropy_ref, x.double(), w.double(), b.double(), t)
    for a, e in zip(ours, exact):  # fp32 against fp64: numerics.py
        torch.testing.assert_close(a.double().cpu(), e.cpu(), rtol=1e-5, atol=1e-6)


def test_bf16_is_no_worse_than_torch_in_bf16(device):
    x, w, b, t = problem(45, 32, 777, torch.bfloat16, seed=3, device=device)
    ours = loss_and_grads(linear_cross_entropy, x, w, b, t)
    lowp = loss_and_grads(linear_cross_entropy_ref, x, w, b, t)
    exact = loss_and_grads(linear_cross_entropy_ref, x.double(), w.double(), b.double(), t)
    assert ours[0].dtype == torch.float32
    assert_no_worse_than_torch(ours[0].cpu(), exact[0].cpu(), lowp[0].cpu(), atol=1e-6)
    for a, e, lp in zip(ours[1:], exact[1:], lowp[1:]):
        assert a.dtype == torch.bfloat16
        scale = e.abs().max().item()
        assert_no_worse_than_torch(a.cpu(), e.cpu(), lp.cpu(), atol=scale * 2**-8)


def test_several_chunks_and_no_bias_agree(device, monkeypatch):
    monkeypatch.setattr(linear_ce, "chunk_rows", lambda n, d, v: 7)  # 50 rows: 8 chunks, the last one short
    x, w, _, t = problem(50, 16, 300, torch.float32, seed=5, device=device)
    ours = loss_and_grads(lambda x, w, b, t: linear_cross_entropy(x, w, None, t) * 3.0, x, w, w[:, 0], t)
    ref = loss_and_grads(lambda x, w, b, t: linear_cross_entropy_ref(x, w, None, t) * 3.0, x, w, w[:, 0], t)
    for a, e in zip(ours[:3], ref[:3]):  # fp32 both, sums in other orders: numerics.py
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_sum_reduction_matches(device):
    x, w, b, t = problem(30, 16, 200, torch.float32, seed=9, device=device)
    ours = loss_and_grads(lambda *a: linear_cross_entropy(*a, reduction="sum"), x, w, b, t)
    ref = loss_and_grads(lambda *a: linear_cross_entropy_ref(*a, reduction="sum"), x, w, b, t)
    for a, e in zip(ours, ref):  # a sum of 30 row losses of ~5: atol 1e-5 is ~1e-7 relative
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_ignored_rows_give_no_loss_and_no_gradient(device):
    x, w, b, t = problem(20, 16, 100, torch.float32, seed=7, ignored=0.0, device=device)
    t[::2] = -100
    loss, dx, _, _ = loss_and_grads(linear_cross_entropy, x, w, b, t)
    assert (dx[::2] == 0).all() and (dx[1::2] != 0).any()
    torch.testing.assert_close(loss, linear_cross_entropy_ref(x[1::2], w, b, t[1::2]), rtol=1e-5, atol=1e-6)
    t[:] = -100
    assert loss_and_grads(linear_cross_entropy, x, w, b, t)[0].item() == 0.0  # nothing counted: 0, not NaN


def test_wrong_shapes_are_refused():
    x, w, b, t = problem(4, 8, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match="expected \\[N, D\\]"):
        linear_cross_entropy(x, w[:, :4], b, t)
