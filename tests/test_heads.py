import pytest
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


@pytest.mark.parametrize("affine", [True, False])
def test_global_batch_norm_is_batch_norm_in_one_process(affine):
    torch.manual_seed(0)
    ours, theirs = GlobalBatchNorm1d(5, affine=affine), nn.BatchNorm1d(5, affine=affine)
    if affine:
        nn.init.normal_(ours.weight), nn.init.normal_(ours.bias)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):  # fp32, the same formula (two-pass variance, as torch's): default tolerance (1.3e-6, 1e-5)
        x = torch.randn(7, 5) * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3
    ours.eval(), theirs.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_global_batch_norm_with_deepspeed_bf16_storage():
    """DeepSpeed's bf16 casts the parameters, not the running statistics; BN must still run, in fp32."""
    torch.manual_seed(0)
    reference = GlobalBatchNorm1d(6)
    nn.init.normal_(reference.weight), nn.init.normal_(reference.bias)
    bf16 = GlobalBatchNorm1d(6)
    bf16.load_state_dict(reference.state_dict())
    bf16.weight.data, bf16.bias.data = bf16.weight.data.bfloat16(), bf16.bias.data.bfloat16()
    x = (torch.randn(9, 6) * 2 + 3).bfloat16()
    y = bf16(x)
    assert y.dtype == torch.bfloat16 and bf16.running_mean.dtype == torch.float32
    expected = reference(x.float())  # fp32 math on the same (bf16-representable) inputs
    bf16_eps = 2.0**-8  # a bf16 output rounds to half an ulp of its 8-bit significand
    torch.testing.assert_close(y.float(), expected, rtol=bf16_eps, atol=bf16_eps * expected.abs().max().item())
    torch.testing.assert_close(bf16.running_var, reference.running_var)
