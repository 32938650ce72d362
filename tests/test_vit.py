import math

import pytest
import torch

from fastvit_ssl.models.vit import ARCH_SPECS, VisionTransformer, sincos_pos_embed


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


def test_sincos_position_embedding():
    grid, dim = 3, 8
    table = sincos_pos_embed(grid, dim)
    assert table.shape == (1, 1 + grid * grid, dim)
    assert torch.all(table[0, 0] == 0)  # class token position
    row, col = 1, 2
    omega = torch.tensor([1.0, 1.0 / 100.0], dtype=torch.float64)  # 1 / 10000^(i / (dim/4)), dim/4 = 2
    expected = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(table[0, 1 + row * grid + col], expected.float())
    assert len({tuple(t.tolist()) for t in table[0, 1:]}) == grid * grid  # every position distinct


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
    torch.testing.assert_close(features, expected)


def test_images_are_encoded_independently():
    model = VisionTransformer("vit_demo", 14).eval()
    x = torch.randn(4, 3, 14, 14)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-5)


def test_conv_stem():
    model = VisionTransformer("vit_conv_small", 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    assert len(model.blocks) == 11


def test_wrong_image_size_is_a_clear_error():
    model = VisionTransformer("vit_demo", 14)
    with pytest.raises(ValueError, match="expected 14x14 images, got \\(28, 28\\)"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="not a multiple"):
        VisionTransformer("vit_demo", 15)
