"""model.compile=true: the encoder blocks run through torch.compile (inductor, on CPU here) and train to the same
losses as eager, with and without activation checkpointing."""

from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl.config import load
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.monitor import read_metrics

# LARS: its step is smooth in the gradient, so rounding differences stay rounding (AdamW's first step is sign(g),
# which turns gradients that are zero up to rounding into full steps of random sign; see tests/test_deepspeed.py)
EAGER = ["eval.knn_every_epochs=0", "run.stop_at_step=3", "optim.name=lars", "optim.base_lr=0.3"]


def losses(summary: dict) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r]


def test_compile_wraps_every_block_of_both_encoders_and_keeps_names():
    cfg = load(None, ["model.arch=vit_demo", "model.img_size=28", "model.compile=true"])
    method = build_method(cfg, REFERENCE_OPS)
    blocks = [m for m in method.modules() if type(m).__name__ == "Block"]
    assert len(blocks) == 8 and all(b._compiled_call_impl is not None for b in blocks)  # 4 online + 4 momentum
    assert "momentum_encoder.blocks.0.attn.qkv.weight" in method.state_dict()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_train_to_the_eager_losses(tiny_overrides, checkpointing):
    torch._dynamo.reset()
    common = [*tiny_overrides, *EAGER, f"model.grad_checkpointing={str(checkpointing).lower()}"]
    eager = train.main([*common, "run.name=eager"])
    compiled = train.main([*common, "run.name=compiled", "model.compile=true"])
    assert len(losses(compiled)) == 3
    # inductor's vectorised erf/rsqrt and reduction order differ from eager by a few ulps per op (and differ between
    # AVX2 and AVX-512): ~400 ulps (5e-5) over 3 steps; a wrong block moves the loss by > 1e-2
    assert losses(compiled) == pytest.approx(losses(eager), rel=5e-5)  # measured: 6e-7
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
