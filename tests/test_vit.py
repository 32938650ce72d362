import math

import pytest
import torch

from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastvit_ssl.models.vit import ARCH_SPECS, Fp32BatchNorm2d, VisionTransformer, sincos_pos_embed


@pytest.mark.parametrize(
    "arch, expected",
    [
        # timm's VisionTransformer with num_classes=0 (pos_embed included) has exactly these counts
        ("vit_small", 21_665_664),
        ("vit_base", 85_798_656),
        ("vit_large", 303_301_632),
        ("vit_huge", 630_764_800),
    ],
)
def test_parameter_counts_match_the_standard_architectures(arch, expected):
    with torch.device("meta"):
        model = VisionTransformer(arch, 224)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_small_has_twelve_heads_as_in_moco_v3():
    assert ARCH_SPECS["vit_small"].num_heads == 12


def official_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's vits.py build_2d_sincos_position_embedding, re-derived step by step (fp32, default meshgrid)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32))
    omega = 1.0 / (temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), table], dim=1)


@pytest.mark.parametrize("grid, dim", [(3, 8), (14, 384), (14, 768)])
def test_sincos_position_embedding_is_the_official_one(grid, dim):
    table = sincos_pos_embed(grid, dim)
    assert table.shape == (1, 1 + grid * grid, dim) and torch.all(table[0, 0] == 0)  # class token position
    assert torch.equal(table, official_sincos(grid, dim))
    row, col = 1, 2  # the first half encodes the patch's row
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    expected = torch.cat([(row * omega).sin(), (row * omega).cos(), (col * omega).sin(), (col * omega).cos()])
    torch.testing.assert_close(table[0, 1 + row * grid + col], expected.float())
    assert len({tuple(t.tolist()) for t in table[0, 1:]}) == grid * grid  # every position distinct


def test_a_checkpoint_with_the_old_table_keeps_it_and_says_so(caplog):
    old = VisionTransformer("vit_demo", 28)
    old.pos_embed.data = sincos_pos_embed(4, 192, row_first=False)
    new = VisionTransformer("vit_demo", 28)
    new.load_state_dict(old.state_dict())
    assert torch.equal(new.pos_embed, old.pos_embed) and "halves swapped" in caplog.text


def test_moco_v3_initialisation_and_frozen_patch_projection():
    torch.manual_seed(0)
    model = VisionTransformer("vit_small", 32)
    dim = model.embed_dim
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (dim + dim))  # xavier bound of one D x D matrix, not of 3D x D
    assert qkv.abs().max() > 0.95 * math.sqrt(6 / (dim + dim))
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (fc1.shape[0] + fc1.shape[1]))
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0)
    assert model.cls_token.abs().max() < 1e-5
    assert not model.patch_embed.proj.weight.requires_grad and not model.patch_embed.proj.bias.requires_grad
    assert not model.pos_embed.requires_grad
    trainable = VisionTransformer("vit_small", 32, frozen_patch_embed=False)
    assert trainable.patch_embed.proj.weight.requires_grad


def test_frozen_patch_projection_gets_no_gradient():
    model = VisionTransformer("vit_demo", 14)
    model(torch.randn(2, 3, 14, 14)).sum().backward()
    assert model.patch_embed.proj.weight.grad is None and model.pos_embed.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_forward_shapes_and_pooling(pool):
    model = VisionTransformer("vit_demo", 14, global_pool=pool).eval()
    x = torch.randn(3, 3, 14, 14)
    assert model.forward_tokens(x).shape == (3, 1 + 4, 192)
    features = model(x)
    assert features.shape == (3, 192)
    tokens = model.blocks(model.embed_tokens(x))
    expected = model.norm(tokens)[:, 0] if pool == "token" else model.fc_norm(tokens[:, 1:].mean(1))
    torch.testing.assert_close(features, expected)  # the same fp32 ops in the same order


def test_images_are_encoded_independently():
    model = VisionTransformer("vit_demo", 14).eval()
    x = torch.randn(4, 3, 14, 14)
    # the same fp32 ops on other batch shapes (matmul blocking may differ): a few ulps; mixing images moves O(1)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-5)


def test_conv_stem():
    model = VisionTransformer("vit_conv_small", 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    assert len(model.blocks) == 11


def test_conv_stem_batch_norm_is_batch_norm_and_runs_on_deepspeed_bf16_storage():
    torch.manual_seed(0)
    ours, theirs = Fp32BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    torch.nn.init.normal_(ours.weight), torch.nn.init.normal_(ours.bias)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(2):  # fp32, the same formula: default tolerance (1.3e-6, 1e-5)
        x = torch.randn(3, 4, 5, 5) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()  # DeepSpeed's layout
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    # one bf16 rounding of the output (half an ulp: 2^-9 relative) plus bf16 weights (2^-9 each); |y| < 4
    torch.testing.assert_close(y.float(), theirs(x.bfloat16().float()), rtol=2**-7, atol=2**-7 * 4)


def test_wrong_image_size_is_a_clear_error():
    model = VisionTransformer("vit_demo", 14)
    with pytest.raises(ValueError, match="square images of a multiple of 7 px .*, got shape \\(1, 3, 14, 21\\)"):
        model(torch.randn(1, 3, 14, 21))
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 192)  # other sizes: interpolated positions (DINO's crops)
    with pytest.raises(ValueError, match="14x14 with a relative position bias"):
        VisionTransformer("vit_demo", 14, rel_pos_bias="shared", pos_embed="none")(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 14, 14, dtype=torch.uint8))  # uint8 comes channels-last
    with pytest.raises(ValueError, match="not a multiple"):
        VisionTransformer("vit_demo", 15)


@pytest.mark.parametrize("arch, size", [("vit_demo", 14), ("vit_conv_small", 32)])
def test_uint8_channels_last_images_are_normalised_inside(arch, size):
    model = VisionTransformer(arch, size).eval()
    u = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (u.permute(0, 3, 1, 2).double() / 255 - mean) / std  # what the pipelines hand over without uint8_views
    # inputs one fp32 rounding apart (|x| < 2.7: 2.4e-7), then the same network: differences of a few of its ulps
    torch.testing.assert_close(model(u), model(x.float()), rtol=1e-5, atol=1e-5)
