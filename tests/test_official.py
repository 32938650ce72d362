"""Official MoCo v3 checkpoints (facebookresearch/moco-v3 main_moco.py's layout) both ways."""

from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import load
from fastvit_ssl.eval import export
from fastvit_ssl.eval.encoder import load_encoder, read_checkpoint
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.methods.mocov3 import official_state
from fastvit_ssl.monitor import read_metrics


@pytest.fixture(scope="module")
def ours():
    """A MoCo v3 of the demo ViT at 224 px with the official heads (256 / 4096), BN statistics moved."""
    cfg = load(None, ["model.arch=vit_demo", "model.img_size=224"])
    torch.manual_seed(0)
    method = build_method(cfg, REFERENCE_OPS)
    with torch.no_grad():
        method.online(torch.randn(4, 3, 224, 224), torch.randn(4, 3, 224, 224))  # BN running statistics move
    return {"model": method.state_dict(), "config": cfg.to_dict(), "step": 7}


def test_official_layout_has_the_official_names(ours):
    state = official_state(ours)["state_dict"]
    for key in [
        "module.base_encoder.blocks.3.attn.qkv.weight",
        "module.base_encoder.head.0.weight",  # the projector inside the encoder, as vits.py + builder.py
        "module.base_encoder.head.7.running_var",  # its last BN, without affine parameters
        "module.predictor.3.weight",
        "module.momentum_encoder.head.4.num_batches_tracked",
        "module.momentum_encoder.pos_embed",
    ]:
        assert key in state, key
    # main_lincls.py keeps module.base_encoder.* except the head: exactly the encoder's tensors, timm's names
    kept = {k.removeprefix("module.base_encoder.") for k in state if k.startswith("module.base_encoder.")}
    encoder = build_method(load(None, ["model.arch=vit_demo", "model.img_size=224"]), REFERENCE_OPS).online.base_encoder
    assert {k for k in kept if not k.startswith("head.")} == set(encoder.state_dict())


def test_an_official_checkpoint_loads_exactly_for_evaluation_and_continuation(ours, tmp_path):
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({**official_state(ours), "epoch": 100, "optimizer": {}, "scaler": {}}, path)
    state = read_checkpoint(path)
    assert state["config"]["model"]["arch"] == "vit_demo" and state["official_epoch"] == 100
    for key, value in ours["model"].items():
        assert torch.equal(state["model"][key], value), key
    encoder, cfg = load_encoder(path)
    assert cfg.method.name == "mocov3" and torch.equal(
        encoder.blocks[0].mlp.fc1.weight, ours["model"]["online.base_encoder.blocks.0.mlp.fc1.weight"]
    )


def test_run_init_from_checks_the_model(tiny_overrides, tmp_path):
    first = train.main([*tiny_overrides, "run.stop_at_step=2"])
    again = train.main([*tiny_overrides, "run.name=again", f"run.init_from={first['checkpoint']}"])
    assert again["steps"] == 6
    first_loss = [
        [r["loss"] for r in read_metrics(Path(s["run_dir"]) / "metrics.jsonl") if "loss" in r][0]
        for s in (first, again)
    ]
    assert first_loss[1] != first_loss[0]  # same data and seed: only the starting weights differ
    init = f"run.init_from={first['checkpoint']}"
    with pytest.raises(CheckpointError, match="model.img_size: 14 there, 28 here"):
        train.main([*tiny_overrides, "run.name=other", "model.img_size=28", init])
    with pytest.raises(CheckpointError, match=r"another model: model.num_heads: 3 there, 1 here$"):  # same shapes
        train.main([*tiny_overrides, "run.name=heads", "model.num_heads=1", init])
    same = train.main([*tiny_overrides, "run.name=same", "model.num_heads=3", "model.grad_checkpointing=true", init])
    assert same["steps"] == 6  # the arch's 3 heads, named; how the model runs may differ


def test_official_export_cli(tiny_overrides, tmp_path):
    summary = train.main([*tiny_overrides, "run.stop_at_step=1"])
    with pytest.raises(CheckpointError, match="the official scripts build vit_small"):
        export.main(["--format", "official", "--checkpoint", summary["run_dir"], "--out", str(tmp_path / "x.pth.tar")])
