"""model.attention: every kernel this CPU runs computes the same attention (in float64, where the comparison is of
formulas, not of summation orders), and a kernel that cannot run here or with this model is a one-line error."""

from unittest import mock

import pytest
import torch

from fastvit_ssl.models import attention
from fastvit_ssl.models.attention import AttentionUnavailable, attention_fn, check_available
from fastvit_ssl.models.vit import VisionTransformer

CPU = torch.device("cpu")
ON_CPU = ["auto", "flash", "math", "flex", "explicit"]  # flex: forward only (it has no backward on CPUs)


def formula(q, k, v, bias):
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + (0 if bias is None else bias)
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernels_compute_softmax_attention(backend, with_bias):
    if with_bias and backend == "flash":
        pytest.skip("flash takes no logit bias (a config error, tested below)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))  # T = 17: odd
    bias = torch.randn(1, 3, 17, 17, generator=g, dtype=torch.float64) if with_bias else None
    if backend == "flex":  # compiled FlexAttention takes fp32 at most on a CPU: against the fp64 formula
        out = attention_fn(backend)(q.float(), k.float(), v.float(), None if bias is None else bias.float())
        # 17-term sums of values ~1 in fp32: a few 1e-7 (tests/kernels/numerics.py's rule)
        torch.testing.assert_close(out.double(), formula(q, k, v, bias), rtol=1e-5, atol=1e-6)
        return
    check_available(backend, CPU, with_bias)
    # fp64 (roundoff 1.1e-16) through a 17-term softmax and 8-term products of values ~1: 1e-12 is generous
    torch.testing.assert_close(attention_fn(backend)(q, k, v, bias), formula(q, k, v, bias), rtol=1e-12, atol=1e-12)


def test_a_vit_gives_the_same_features_with_every_kernel():
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    features = {}
    for backend in ON_CPU:
        torch.manual_seed(0)
        dtype = torch.float32 if backend == "flex" else torch.float64  # see above
        with torch.no_grad():
            features[backend] = VisionTransformer("vit_demo", 28, attention=backend).to(dtype).eval()(x.to(dtype))
    for backend in ON_CPU[1:]:  # fp64 through 4 blocks: as above; fp32: a few ulps of features ~1 per block
        tolerance = 1e-5 if backend == "flex" else 1e-10
        torch.testing.assert_close(features[backend].double(), features["auto"], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "backend, device, bias, precision, message",
    [
        ("efficient", "cpu", False, "fp32", "runs on CUDA devices only; use auto on cpu"),
        ("flex", "cpu", False, "fp32", "runs on CUDA devices only"),
        ("flash", "cpu", True, "fp32", "cannot add a logit bias"),
        ("flash", "cuda", False, "fp32", "computes in bf16 or fp16 on CUDA"),
        ("flash_attn2", "cuda", False, "bf16", "needs the flash-attn package"),
        ("cudnn", "cuda", False, "bf16", "older than 9.15.1"),
    ],
)
def test_an_unavailable_kernel_is_a_clear_error(backend, device, bias, precision, message):
    with (
        mock.patch("importlib.util.find_spec", lambda name: None),
        mock.patch("torch.backends.cudnn.version", lambda: 90100),
        pytest.raises(AttentionUnavailable, match=message),
    ):
        check_available(backend, torch.device(device), bias, precision)


def test_auto_leaves_out_cudnn_where_its_version_is_bad():
    with mock.patch("torch.backends.cudnn.version", lambda: 91400):
        assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in attention.auto_backends()
    with mock.patch("torch.backends.cudnn.version", lambda: 91501):
        assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION in attention.auto_backends()


def test_flash_attn_package_kernels_get_their_layout(monkeypatch):
    """FA2 returns the output, FA3/FA4 (out, lse); all take [B, T, heads, d]."""
    seen = {}

    def fake(q, k, v, softmax_scale):
        seen["shape"], seen["scale"] = tuple(q.shape), softmax_scale
        out = formula(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2)
        return out, None

    monkeypatch.setattr("importlib.import_module", lambda name: mock.Mock(flash_attn_func=fake))
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention_fn("flash_attn3")(q, k, v, None), formula(q, k, v, None))
    assert seen["shape"] == (2, 5, 3, 8) and seen["scale"] == pytest.approx(8**-0.5)
