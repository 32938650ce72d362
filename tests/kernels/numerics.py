"""Tolerances for kernel tests, tied to each dtype's own error (the rule of flash-attention's tests).

fp32 kernels against the float64 reference: a sum of n fp32 terms carries a rounding error that grows like
sqrt(n) u sum|terms| (u = 2^-24 = 6e-8; Higham & Mary 2019 bound it so with high probability), at most 16 u for the
n <= 256 terms of these tests' reductions, and exp, log and divisions add a few u each. Values of size ~1 are thus
within ~1e-6 relative of exact whatever the order of the sums (which differs between CPUs' vector paths and GPUs'
tiles): rtol 1e-5 leaves a margin of ~10. Gradients are differences (softmax minus one-hot, sums of dout x rows)
that lose up to a digit against their largest element: rtol 1e-4, or an atol tied to that largest element. A wrong
index, mask or scale errs by O(1).

bf16 outputs are held to PyTorch's own bf16 error (assert_no_worse_than_torch). fp32 outputs of bf16 products (a
kernel under autocast that does not round its result) are held to the error that rounding the operands allows
(assert_within_rounded_products): an element-wise comparison with torch, which rounds its output too, would fail
wherever torch's two roundings happen to cancel.
"""

import math

import pytest
import torch

# One unit in the last place, relative: 2^-23 for fp32, 2^-7 for bf16 (with 8 significand bits).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_no_worse_than_torch(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, atol: float = 0.0):
    """|out - exact| <= 2 |torch at the same precision - exact| + atol + 1 ulp of out's dtype, element-wise: the
    kernel may not be less accurate than PyTorch's own computation in that dtype, beyond rounding its output once
    (the Triton interpreter truncates on stores, so a round-off can reach one ulp)."""
    err = (out.double() - ref64).abs()
    bound = 2 * (torch_lowp.double() - ref64).abs() + atol + ULP[out.dtype] * ref64.abs()
    worst = (err - bound).argmax()
    assert torch.all(err <= bound), (
        f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} (max error {err.max():.3g})"
    )


def assert_within_rounded_products(out, ref64, magnitude64, terms: int, operands=torch.bfloat16):
    """A linear map whose operands are rounded to `operands` (unit roundoff u = ulp / 2) and whose sums of `terms`
    products run in fp32: each product x w errs by at most |x w| (2u + u^2), the fp32 sum by n 2^-24 sum |x w|
    (Higham's deterministic bound), the fp32 output by one ulp. `magnitude64` is the map applied to the absolute
    values (sum |x w| per element), in float64. Worst-case bounds: they hold on any machine and any summation order."""
    u = ULP[operands] / 2
    err = (out.double() - ref64).abs()
    bound = (2 * u + u * u + (terms + 1) * 2.0**-24) * magnitude64 + ULP[torch.float32] * ref64.abs()
    worst = (err - bound).argmax()
    assert torch.all(err <= bound), (
        f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} (max error {err.max():.3g})"
    )


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floats, so an output element a kernel forgets stays NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture
def poisoned(monkeypatch):
    poison_empty(monkeypatch)
