import pytest
import torch

from fastvit_ssl.kernels.contrastive import MAX_DIM, contrastive_loss, contrastive_loss_ref
from fastvit_ssl.kernels.target import A100, H100, planning_for
from fastvit_ssl.specs import CONTRASTIVE_KERNEL_MAX_DIM
from numerics import assert_no_worse_than_torch

# (N queries, M keys, D, label offset): N = 1 and 3, D not a power of two, M != N, rank offsets, partial tiles
SHAPES = [(1, 1, 1, 0), (3, 6, 255, 3), (5, 5, 256, 0), (17, 51, 200, 34), (40, 130, 64, 80)]


def run(q, k, t, offset, fn):
    q = q.detach().clone().requires_grad_()
    loss = fn(q, k, t, offset)
    loss.backward()
    return loss.detach(), q.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_the_float64_reference(shape, poisoned, device):
    N, M, D, offset = shape
    g = torch.Generator().manual_seed(N * 1000 + M)
    q, k = torch.randn(N, D, generator=g).to(device), torch.randn(M, D, generator=g).to(device)
    loss, dq = run(q, k, 0.2, offset, contrastive_loss)
    loss64, dq64 = run(q.double(), k.double(), 0.2, offset, contrastive_loss_ref)
    assert torch.isfinite(dq).all()  # tolerances: fp32 against fp64, see numerics.py
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq.double(), dq64, rtol=1e-4, atol=1e-5 * dq64.abs().max().item() + 1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_bf16_is_no_worse_than_torch_bf16(shape, poisoned, device):
    N, M, D, offset = shape
    g = torch.Generator().manual_seed(N * 1000 + M + 1)
    q, k = (torch.randn(n, D, generator=g).bfloat16().to(device) for n in (N, M))
    loss, dq = run(q, k, 0.2, offset, contrastive_loss)
    loss64, dq64 = run(q.double(), k.double(), 0.2, offset, contrastive_loss_ref)
    loss16, dq16 = run(q, k, 0.2, offset, contrastive_loss_ref)
    assert loss.dtype == torch.float32 and dq.dtype == torch.bfloat16  # fp32 accumulation, gradient in q's dtype
    assert_no_worse_than_torch(loss, loss64, loss16)
    assert_no_worse_than_torch(dq, dq64, dq16)


def test_temperature_and_large_logits(device):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 32, generator=g).to(device)
    k = torch.cat([q * 3, torch.randn(8, 32, generator=g).to(device)])  # positives aligned: logits up to 1 / tau = 100
    for t in (0.01, 0.2, 1.0):
        loss, dq = run(q, k, t, 0, contrastive_loss)
        loss64, dq64 = run(q.double(), k.double(), t, 0, contrastive_loss_ref)
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)  # numerics.py
        torch.testing.assert_close(dq.double(), dq64, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named():
    q = torch.randn(4, 8)  # validation happens before any launch
    with pytest.raises(ValueError, match="labels 2..5 fall outside the 4 keys"):
        contrastive_loss(q, torch.randn(4, 8), 0.2, label_offset=2)
    with pytest.raises(ValueError, match="must not require grad"):
        contrastive_loss(q, torch.randn(4, 8, requires_grad=True), 0.2)
    with pytest.raises(ValueError, match=r"q \[N, D\] and k \[M, D\] expected"):
        contrastive_loss(q, torch.randn(4, 9), 0.2)
    with pytest.raises(ValueError, match="must match"):
        contrastive_loss(q, torch.randn(4, 8).double(), 0.2)
    with pytest.raises(ValueError, match="feature dim 257 > 256"):
        contrastive_loss(torch.randn(4, 257), torch.randn(4, 257), 0.2)


def test_the_config_knows_the_kernels_feature_limit():
    assert CONTRASTIVE_KERNEL_MAX_DIM == MAX_DIM


def test_memory_is_linear_in_the_batch(device):
    """The design stores [N] log-sum-exps and row losses, never the [N, M] logits: check the saved tensors."""
    q, k = torch.randn(16, 8, device=device, requires_grad=True), torch.randn(64, 8, device=device)
    loss = contrastive_loss(q, k, 0.2)
    saved = loss.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) == max(q.numel(), k.numel())
    assert not any(t.shape == (16, 64) for t in saved)


@pytest.mark.parametrize("target", [A100, H100], ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_shipped_gpu_configuration(target, dtype, poisoned, device):
    """The block sizes a launch on that GPU uses, run through the interpreter: several query and key tiles with
    ragged edges, D = 200 inside a 256-wide tile."""
    N, M, D, offset = 70, 150, 200, 80
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(n, D, generator=g).to(device, dtype) for n in (N, M))
    with planning_for(target):
        loss, dq = run(q, k, 0.2, offset, contrastive_loss)
    loss64, dq64 = run(q.double(), k.double(), 0.2, offset, contrastive_loss_ref)
    if dtype == torch.float32:  # numerics.py
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dq.double(), dq64, rtol=1e-4, atol=1e-5 * dq64.abs().max().item())
    else:
        loss16, dq16 = run(q, k, 0.2, offset, contrastive_loss_ref)
        assert_no_worse_than_torch(loss, loss64, loss16)
        assert_no_worse_than_torch(dq, dq64, dq16)
