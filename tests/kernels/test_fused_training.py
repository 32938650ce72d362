"""The kernels inside the model: a fused ViT equals the reference one, training with fused kernels follows the
reference losses, and the kernels import from an installed copy of the package."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvit_ssl.config import load
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, fused_ops, select_ops
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models import vit
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.schedules import Hyperparameters

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def micro_arch(monkeypatch):
    monkeypatch.setitem(vit.ARCH_SPECS, "vit_micro", vit.ArchSpec(embed_dim=32, depth=2, num_heads=2, patch_size=7))
    return ["model.arch=vit_micro", "model.img_size=14", "moco.dim=16", "moco.mlp_dim=64"]


@pytest.mark.parametrize("uint8", [False, True], ids=["float-nchw", "uint8-nhwc"])
def test_fused_patch_embedding_gives_the_same_vit(micro_arch, uint8, device):
    torch.manual_seed(0)
    ref = vit.VisionTransformer("vit_micro", 14, frozen_patch_embed=False).to(device)
    fused = vit.VisionTransformer("vit_micro", 14, frozen_patch_embed=False, patch_embed_fn=fused_ops()["patch_embed"])
    fused.to(device).load_state_dict(ref.state_dict())
    u = torch.randint(0, 256, (3, 14, 14, 3), dtype=torch.uint8, device=device)
    x = vit.normalize_uint8(u) if uint8 else torch.randn(3, 3, 14, 14, device=device)
    fused_input = u if uint8 else x  # uint8: the kernel normalises while it gathers the patches
    torch.testing.assert_close(fused(fused_input), ref(x), rtol=1e-5, atol=1e-5)
    fused(fused_input).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(
        fused.patch_embed.proj.weight.grad, ref.patch_embed.proj.weight.grad, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("uint8", [False, True], ids=["float-nchw", "uint8-nhwc"])
def test_fused_visible_patch_embedding_gives_the_same_mae_encoder(micro_arch, uint8, device):
    """MAE's encoder with the kernel that embeds only the kept patches equals the one that embeds all and gathers
    (fp32 vs fp32 in another order: the bounds above)."""
    torch.manual_seed(0)
    mae = dict(frozen_patch_embed=False, pos_embed="sincos_cols_first", init="xavier_joint")
    ref = vit.VisionTransformer("vit_micro", 14, **mae).to(device)
    fused = vit.VisionTransformer("vit_micro", 14, **mae, patch_embed_fn=fused_ops()["patch_embed"])
    fused.to(device).load_state_dict(ref.state_dict())
    u = torch.randint(0, 256, (3, 14, 14, 3), dtype=torch.uint8, device=device)
    x = vit.normalize_uint8(u) if uint8 else torch.randn(3, 3, 14, 14, device=device)
    keep = torch.rand(3, 4).argsort(1)[:, :1].to(device)  # one of the 4 patches each, as 75% masking keeps
    out, expected = fused.forward_visible(u if uint8 else x, keep), ref.forward_visible(x, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(
        fused.patch_embed.proj.weight.grad, ref.patch_embed.proj.weight.grad, rtol=1e-4, atol=1e-5
    )


def train(overrides, ops, device, steps=24):
    cfg = load(None, overrides)
    torch.manual_seed(0)
    model = build_method(cfg, ops).to(device)
    engine = LocalEngine(model, build_optimizer(cfg.optim, model.param_groups(), ops), device)
    losses = []
    images = torch.randn(8, 3, 14, 14, generator=torch.Generator().manual_seed(100))
    for step in range(steps):
        noise = torch.randn(2, 8, 3, 14, 14, generator=torch.Generator().manual_seed(step))
        views = (images + 0.3 * noise).to(device)
        lr = 0.05 if cfg.optim.name == "lars" else 2e-3
        hparams = Hyperparameters(lr, cfg.optim.weight_decay, 0.99, {"teacher_temp": 0.04, "last_layer": 1.0})
        metrics, _ = engine.step(list(views), step, hparams)
        losses.append(metrics["loss"])
    return torch.stack(losses)


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_training_with_fused_kernels_follows_the_reference(micro_arch, optimizer, device):
    # LAMB with eps=1e-3: with eps=1e-8 its first step is sign(g) per element, which turns gradients that are zero
    # up to rounding (the key part of the qkv bias, which softmax ignores) into full steps of random sign
    eps = ["optim.eps=1e-3"] if optimizer == "lamb" else []
    overrides = [*micro_arch, f"optim.name={optimizer}", "model.frozen_patch_embed=false", *eps]
    ref_losses = train(overrides, REFERENCE_OPS, device)
    fused_losses = train(overrides, fused_ops(), device)
    assert ref_losses[-4:].mean() < ref_losses[:4].mean() - 0.1  # it does learn (measured: 2.2 -> 0.5)
    # The kernels sum in other orders than torch: a few ulps per op, carried by 24 steps whose updates are smooth
    # in the gradient; measured up to 4e-6 (~35 ulps) apart. ~800 ulps allowed; a wrong kernel moves them by > 1e-2.
    torch.testing.assert_close(fused_losses, ref_losses, rtol=1e-4, atol=0)


def test_dino_trains_with_its_fused_loss_as_with_the_reference(micro_arch, device):
    """The fused prototype loss inside DINO's step (its centre moves in place after each loss), LARS, 8 steps of
    the two global crops: the bounds of the test above."""
    dino = ["method.name=dino", "model.pos_embed=learned", "dino.local_crops=0", "dino.drop_path=0"]
    small = ["dino.out_dim=300", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]
    overrides = [*micro_arch, *dino, *small, "optim.name=lars", "model.frozen_patch_embed=false"]
    ref_losses = train(overrides, REFERENCE_OPS, device, steps=8)
    fused_losses = train(overrides, fused_ops(), device, steps=8)
    torch.testing.assert_close(fused_losses, ref_losses, rtol=1e-4, atol=0)


def test_fused_falls_back_to_references_on_cpu(caplog):
    assert select_ops("fused", torch.device("cpu")) is REFERENCE_OPS
    assert "needs a CUDA device" in caplog.text
    assert select_ops("reference", torch.device("cuda")) is REFERENCE_OPS


def test_kernels_import_from_an_installed_copy(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = "import fastvit_ssl.kernels as k; print(k.__file__); print(k.contrastive_loss.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(target), "TRITON_INTERPRET": "1"},
        timeout=300,
    )
    installed_file, module = result.stdout.split()
    assert installed_file == str(target / "fastvit_ssl" / "kernels" / "__init__.py")
    assert module == "fastvit_ssl.kernels.contrastive"
