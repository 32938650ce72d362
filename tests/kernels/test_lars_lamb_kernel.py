import pytest
import torch
from torch import nn

from fastvit_ssl.kernels.lars_lamb import BLOCK, LAMB, LARS, FusedLAMB, FusedLARS

SHAPES = [(1,), (7,), (BLOCK + 5, 2), (33, 17), (4, 4), (3, 2, 2)]


def make_params(dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in SHAPES]
    params[4].data.zero_()  # |p| = 0: the trust ratio falls back to 1
    grads = [[torch.randn(s, generator=g).to(device, dtype) for s in SHAPES] for _ in range(3)]
    return params, grads


def train(optimizer_cls, params, grads, **kwargs):
    params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = optimizer_cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


CASES = [
    (FusedLARS, LARS, dict(lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)),
    (FusedLAMB, LAMB, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)),
]


@pytest.mark.parametrize("fused, reference, kwargs", CASES, ids=["lars", "lamb"])
def test_fp32_matches_the_reference(fused, reference, kwargs, device):
    params, grads = make_params(torch.float32, 0, device)
    ours, opt = train(fused, params, grads, **kwargs)
    theirs, ref_opt = train(reference, params, grads, **kwargs)
    for a, b in zip(ours, theirs):  # fp32 both; norms summed in other orders: numerics.py
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the same state names and values: checkpoints move between fused and reference optimizers
    for a, b in zip(opt.state_dict()["state"].values(), ref_opt.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused, reference, kwargs", CASES, ids=["lars", "lamb"])
def test_bf16_parameters_with_fp32_state(fused, reference, kwargs, device):
    params, grads = make_params(torch.bfloat16, 1, device)
    ours, opt = train(fused, params, grads[:1], **kwargs)
    theirs, _ = train(reference, params, grads[:1], **kwargs)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=1e-6)  # one bf16 rounding apart
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.ndim)


@pytest.mark.parametrize("fused", [FusedLARS, FusedLAMB])
def test_two_launches_per_step(fused, monkeypatch, device):
    from fastvit_ssl.kernels import lars_lamb as module

    launches = []
    for name in ("_lars_norms_kernel", "_lars_update_kernel", "_lamb_moments_kernel", "_lamb_update_kernel"):
        kernel = getattr(module, name)
        spy = type("Spy", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (launches.append(n), k[grid])[1]})
        monkeypatch.setattr(module, name, spy())
    params, grads = make_params(torch.float32, 2, device)
    train(fused, params, grads[:1], lr=0.1)
    assert len(launches) == 2


def test_parameters_without_gradient_are_left_alone(device):
    params, grads = make_params(torch.float32, 3, device)
    before = params[2].detach().clone()
    opt = FusedLARS(params, lr=0.1)
    for p, g in zip(params, grads[0]):
        p.grad = None if p is params[2] else g
    opt.step()
    assert torch.equal(params[2].detach(), before) and params[2] not in opt.state
