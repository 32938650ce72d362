import torch
from torch import nn

from fastvit_ssl.models.heads import GlobalBatchNorm1d, predictor, projector


def test_projector_and_predictor_layout():
    proj = projector(384, 4096, 256)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == [
        "Linear",
        "GlobalBatchNorm1d",
        "ReLU",
        "Linear",
        "GlobalBatchNorm1d",
        "ReLU",
        "Linear",
        "GlobalBatchNorm1d",
    ]
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 4096), (4096, 4096), (4096, 256)]
    assert all(m.bias is None for m in linears)
    assert proj[-1].affine is False and proj[1].affine is True
    pred = predictor(256, 4096)
    assert [type(m).__name__ for m in pred] == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear", "GlobalBatchNorm1d"]
    assert pred[-1].affine is False


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    ours, theirs = GlobalBatchNorm1d(5), nn.BatchNorm1d(5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 5) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
