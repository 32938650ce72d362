import math

import torch

from fastvit_ssl.methods.losses import contrastive_loss_ref


def explicit_loss(q, k, t, offset):
    """2t * mean_i [-log softmax_j(cos(q_i, k_j) / t) at j = i + offset], written out element by element."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / t for j in range(k.shape[0])]
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += log_z - logits[i + offset]
    return 2 * t * total / q.shape[0]


def test_loss_matches_the_formula_with_a_rank_offset():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, dtype=torch.float64, generator=g)
    k = torch.randn(15, 7, dtype=torch.float64, generator=g)  # keys of 3 ranks; this is rank 1
    loss = contrastive_loss_ref(q, k, 0.2, label_offset=5)
    assert abs(loss.item() - explicit_loss(q, k, 0.2, 5)) < 1e-12  # fp64 (roundoff 1.1e-16), a loss of ~3


def test_loss_gradient():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(6, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda q: contrastive_loss_ref(q, k, 0.5, label_offset=3), (q,))


def test_loss_is_scale_invariant_and_perfect_keys_give_a_small_loss():
    q = torch.eye(4, dtype=torch.float64)
    assert contrastive_loss_ref(q, q * 3, 0.1).item() < 1e-3  # 2 tau log(1 + 3 exp(-10)) = 2.7e-5
    torch.testing.assert_close(contrastive_loss_ref(q * 5, q, 0.1), contrastive_loss_ref(q, q, 0.1))  # fp64: 1e-7
