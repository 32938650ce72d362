"""The fused DINO loss (kernels/prototype_ce.py) against its reference: fresh random inputs at odd shapes (B = 1,
one local crop, one or two global crops, K off the tile), fp32 against float64 and bf16/fp16 against PyTorch's own
error, the loss and the student's gradient; the GPU tiles through the interpreter; errors and what is not saved."""

import pytest
import torch

from fastvit_ssl.kernels.prototype_ce import prototype_cross_entropy, prototype_cross_entropy_ref
from fastvit_ssl.kernels.target import A100, H100, planning_for
from numerics import assert_no_worse_than_torch

TS, TT = 0.1, 0.04  # DINO's student and (final) teacher temperatures: sharp softmaxes, exponents up to ~100

# (V crops, B, K, G global crops): B = 1; V = G + 1 (one local crop); V = G (global crops only); G = 1; K odd;
# V < G (the reference allows it: the student's one crop against the teacher's other)
SHAPES = [(3, 1, 300, 2), (2, 5, 1000, 1), (4, 7, 777, 2), (2, 3, 129, 2), (5, 2, 2000, 1), (1, 4, 300, 2)]


def problem(V, B, K, G, dtype, seed, device):
    """Student and teacher logits of a unit-scale head (DINO's weight-normalised last layer gives |s| <~ 1 per unit
    of input norm; unit normal values make s / ts ~ 10 and (t - c) / tt ~ 25) and a centre a tenth of that."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(V * B, K, generator=g).to(device, dtype)
    teacher = torch.randn(G * B, K, generator=g).to(device, dtype)
    center = (torch.randn(1, K, generator=g) * 0.1).to(device)  # DINO keeps its centre in fp32
    return student, teacher, center


def run(fn, student, teacher, center, G, ts=TS, tt=TT):
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher, center, ts, tt, G)
    loss.backward()
    return loss.detach(), student.grad


def fp32_tolerances(student, G, ts, grad64):
    """numerics.py's rule for fp32 against fp64. Each row's loss is count * LSE(s / ts) - <Q, s> / ts, a difference
    of terms up to G max|s| / ts, each within ~1e-6 relative: atol 1e-5 of that size. The gradient's entries are
    (count p - Q) / (B P ts) with p, Q in [0, 1] from exponents of size up to ~100 (1e-5 relative each), a difference
    that loses up to a digit: rtol 1e-4 with an atol of 1e-5 of the largest entry."""
    loss_atol = 1e-5 * G * student.abs().max().item() / ts
    return dict(rtol=1e-5, atol=loss_atol), dict(rtol=1e-4, atol=1e-5 * grad64.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_the_float64_reference(shape, poisoned, device):
    V, B, K, G = shape
    student, teacher, center = problem(V, B, K, G, torch.float32, sum(shape), device)
    loss, grad = run(prototype_cross_entropy, student, teacher, center, G)
    loss64, grad64 = run(prototype_cross_entropy_ref, student.double(), teacher.double(), center.double(), G)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and torch.isfinite(grad).all()
    loss_tol, grad_tol = fp32_tolerances(student, G, TS, grad64)
    torch.testing.assert_close(loss.double(), loss64, **loss_tol)
    torch.testing.assert_close(grad.double(), grad64, **grad_tol)


@pytest.mark.parametrize("ts, tt", [(1.0, 1.0), (0.1, 0.07), (0.05, 0.01)], ids=str)
def test_temperatures(ts, tt, device):
    """Flat and very sharp distributions (exponents up to ~500 at tt = 0.01): the same fp32 rule."""
    student, teacher, center = problem(4, 3, 500, 2, torch.float32, 11, device)
    loss, grad = run(prototype_cross_entropy, student, teacher, center, 2, ts, tt)
    loss64, grad64 = run(prototype_cross_entropy_ref, student.double(), teacher.double(), center.double(), 2, ts, tt)
    loss_tol, grad_tol = fp32_tolerances(student, 2, ts, grad64)
    torch.testing.assert_close(loss.double(), loss64, **loss_tol)
    torch.testing.assert_close(grad.double(), grad64, **grad_tol)


def check_low_precision(student, teacher, center, G, loss, grad):
    """Both the kernel and the reference compute in fp32 from the same bf16/fp16 inputs: the loss (fp32) is held to
    the fp32 rule's atol on top of torch's error, the gradient (in the student's dtype) to torch's rounding of it."""
    loss_lp, grad_lp = run(prototype_cross_entropy_ref, student, teacher, center, G)
    loss64, grad64 = run(prototype_cross_entropy_ref, student.double(), teacher.double(), center.double(), G)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype  # fp32 accumulation, gradient in s's dtype
    loss_tol, grad_tol = fp32_tolerances(student.float(), G, TS, grad64)
    assert_no_worse_than_torch(loss, loss64, loss_lp, atol=loss_tol["atol"])
    assert_no_worse_than_torch(grad, grad64, grad_lp, atol=grad_tol["atol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]], ids=str)
def test_low_precision_is_no_worse_than_torch(shape, dtype, poisoned, device):
    V, B, K, G = shape
    student, teacher, center = problem(V, B, K, G, dtype, sum(shape) + 1, device)
    check_low_precision(student, teacher, center, G, *run(prototype_cross_entropy, student, teacher, center, G))


@pytest.mark.parametrize("target", [A100, H100], ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_shipped_gpu_configuration(target, dtype, poisoned, device):
    """The tiles a launch on that GPU uses, run through the interpreter: K = 2,500 is two full 1,024-wide tiles and
    a ragged one, for the reductions' loop and the gradient's grid of tiles."""
    V, B, K, G = 3, 5, 2500, 2
    student, teacher, center = problem(V, B, K, G, dtype, 7, device)
    with planning_for(target):
        loss, grad = run(prototype_cross_entropy, student, teacher, center, G)
    if dtype == torch.float32:
        loss64, grad64 = run(prototype_cross_entropy_ref, student.double(), teacher.double(), center.double(), G)
        loss_tol, grad_tol = fp32_tolerances(student, G, TS, grad64)
        torch.testing.assert_close(loss.double(), loss64, **loss_tol)
        torch.testing.assert_close(grad.double(), grad64, **grad_tol)
    else:
        check_low_precision(student, teacher, center, G, loss, grad)


def test_teacher_and_center_get_no_gradient(device):
    student, teacher, center = problem(3, 2, 100, 2, torch.float32, 3, device)
    student, teacher, center = (x.clone().requires_grad_() for x in (student, teacher, center))
    prototype_cross_entropy(student, teacher, center, TS, TT).backward()
    assert teacher.grad is None and center.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_a_flat_center_is_the_same(device):
    student, teacher, center = problem(3, 2, 100, 2, torch.float32, 5, device)
    flat = prototype_cross_entropy(student, teacher, center[0], TS, TT)
    assert flat.item() == prototype_cross_entropy(student, teacher, center, TS, TT).item()


def test_nothing_of_size_v_b_k_is_saved(device):
    """Saved for backward: the inputs and (V + G) B log-sum-exps, never a [V B, K] probability tensor."""
    student, teacher, center = problem(4, 3, 200, 2, torch.float32, 4, device)
    loss = prototype_cross_entropy(student.requires_grad_(), teacher, center, TS, TT)
    saved = loss.grad_fn.saved_tensors
    assert sorted(t.numel() for t in saved) == sorted([student.numel(), teacher.numel(), center.numel(), 12, 6])


def test_bad_shapes_are_named():
    s, t, c = torch.randn(12, 10), torch.randn(4, 10), torch.zeros(1, 10)  # V = 6, B = 2, G = 2
    with pytest.raises(ValueError, match="student has 13 rows, not V \\* B for B = 2"):
        prototype_cross_entropy(torch.randn(13, 10), t, c, TS, TT)
    with pytest.raises(ValueError, match="student has K = 10 prototypes, teacher 9"):
        prototype_cross_entropy(s, torch.randn(4, 9), c, TS, TT)
    with pytest.raises(ValueError, match="center \\(1, 9\\), expected \\[1, 10\\]"):
        prototype_cross_entropy(s, t, torch.zeros(1, 9), TS, TT)
    with pytest.raises(ValueError, match="teacher has 4 rows, not a positive multiple of 3 crops"):
        prototype_cross_entropy(s, t, c, TS, TT, global_crops=3)
    with pytest.raises(ValueError, match="expected \\[V \\* B, K\\], \\[G \\* B, K\\]"):
        prototype_cross_entropy(s[None], t, c, TS, TT)
    with pytest.raises(ValueError, match="no \\(teacher, student\\) pair"):
        prototype_cross_entropy(s[:2], t[:2], c, TS, TT, global_crops=1)
    with pytest.raises(ValueError, match="teacher is torch.float64"):
        prototype_cross_entropy(s, t.double(), c, TS, TT)
