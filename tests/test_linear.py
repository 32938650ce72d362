"""The two linear-probe protocols of eval/linear.py on synthetic features with a known answer."""

import pytest
import torch
from torch import nn

from fastvit_ssl.eval import linear


def clusters(n: int, seed: int):
    """Four Gaussian classes in 32 dimensions, offset by 0.5 std: linearly separable up to ~2% overlap."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    means = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 3
    return means[y] + 0.5 * torch.randn(n, 32, generator=g) * 3 + 10.0, y  # + 10: features need not be centred


def test_heads_of_the_two_protocols():
    head = linear.make_head(32, 4, "sgd")
    assert isinstance(head, nn.Linear) and head.bias.abs().sum() == 0  # the official: the ViT's Linear alone
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.3)  # 128 seeded draws: std error 6%
    bn, fc = linear.make_head(32, 4, "lars_bn")
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and isinstance(fc, nn.Linear)


@pytest.mark.parametrize("protocol, base_lr", [("sgd", None), ("lars_bn", 2.0)])  # MAE's lr is for 16k batches
def test_each_protocol_learns_separable_classes(protocol, base_lr):
    (train_f, train_y), (val_f, val_y) = clusters(2000, 1), clusters(500, 2)
    top1, top5 = linear.train_head(train_f, train_y, val_f, val_y, 4, protocol, epochs=30, batch=256, base_lr=base_lr)
    assert top1 > 90 and top5 == 100


def test_mocov3_steps_its_cosine_once_per_epoch(monkeypatch):
    seen = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: seen.append(self.param_groups[0]["lr"]) or step(self))
    (f, y) = clusters(1024, 3)
    linear.train_head(f, y, f, y, 4, "sgd", epochs=4, batch=256, base_lr=1.0)  # 4 steps per epoch
    assert seen[:4] == [1.0] * 4 and seen[4] == seen[7] < 1.0 and len(set(seen)) == 4
