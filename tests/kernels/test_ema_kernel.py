import pytest
import torch

from fastvit_ssl.kernels.ema import BLOCK, ema_update_, ema_update_ref_

# one element, odd sizes, exactly one block, more than one block, matrices
SHAPES = [(1,), (7,), (BLOCK,), (BLOCK + 3,), (33, 17), (2, 3, 5)]


def make(dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]
    params = [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]
    return ema, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, 0.99, 0.99996, 1.0])
def test_matches_the_exact_update(dtype, momentum, device):
    ema, params = make(dtype, int(momentum * 1e5), device)
    exact = [momentum * e.double() + (1 - momentum) * p.double() for e, p in zip(ema, params)]
    ema_update_(ema, params, momentum)
    for got, want in zip(ema, exact):
        assert got.dtype == dtype
        # fp32 math, then one rounding to the storage dtype (the interpreter truncates: up to one ulp)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
        torch.testing.assert_close(got.double(), want, rtol=ulp, atol=1e-7)


def test_matches_the_reference_and_mixed_dtypes(device):
    ema, params = make(torch.float32, 1, device)
    ema[1], params[3] = ema[1].bfloat16(), params[3].bfloat16()  # two dtype groups beside the fp32 one
    expected = [e.clone() for e in ema]
    ema_update_ref_(expected, params, 0.9)
    ema_update_(ema, params, 0.9)
    for got, want in zip(ema, expected):
        ulp = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-22
        torch.testing.assert_close(got, want, rtol=ulp, atol=1e-7)


def test_one_launch_per_dtype_group(monkeypatch, device):
    from fastvit_ssl.kernels import ema as module

    launches = []
    kernel = module._ema_kernel
    monkeypatch.setattr(
        module,
        "_ema_kernel",
        type("Spy", (), {"__getitem__": lambda self, grid: (launches.append(grid), kernel[grid])[1]})(),
    )
    ema, params = make(torch.float32, 2, device)
    ema_update_(ema, params, 0.5)
    assert len(launches) == 1 and launches[0][0] == sum(-(-e.numel() // BLOCK) for e in ema)


def test_mismatched_lists_are_errors():
    with pytest.raises(ValueError, match="2 EMA tensors but 1 parameters"):
        ema_update_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.9)
    with pytest.raises(ValueError, match="does not match parameter"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)
