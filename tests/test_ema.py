import pytest
import torch

from fastvit_ssl.methods.ema import ema_update_ref_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_update_matches_the_formula(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (1,), (2, 3, 4)]
    ema = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    expected = [(0.99 * e.double() + 0.01 * p.double()).to(dtype) for e, p in zip(ema, params)]
    ema_update_ref_(ema, params, 0.99)
    for got, want in zip(ema, expected):
        assert got.dtype == dtype
        # fp32: two roundings of values |x| < 5 (ulp 4.8e-7); bf16: computed in fp32, rounded once, as the fp64 value
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 0.0)


def test_momentum_one_keeps_and_zero_copies():
    ema, params = [torch.randn(4)], [torch.randn(4)]
    before = ema[0].clone()
    ema_update_ref_(ema, params, 1.0)
    assert torch.equal(ema[0], before)
    ema_update_ref_(ema, params, 0.0)
    assert torch.equal(ema[0], params[0])
