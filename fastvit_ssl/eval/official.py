"""MoCo v3's official checkpoints (facebookresearch/moco-v3), both ways.

The official main_moco.py saves {"epoch", "arch", "state_dict", "optimizer", "scaler"}, the model under DDP's
`module.`: base_encoder (a timm ViT whose `head` is the projector), predictor, momentum_encoder (whose `head` is the
momentum projector). Our MoCo v3 holds the same tensors under other names; the map is exact, BN statistics included.

- Reading: every evaluation (kNN, linear probe, fine-tuning, export, pictures) accepts an official checkpoint file
  where it accepts ours, and `train.py run.init_from=FILE` starts a new run from its weights (not its optimizer).
- Writing: `python -m fastvit_ssl.eval.official --checkpoint RUN --out moco_vit.pth.tar` writes one that the official
  main_lincls.py (--pretrained) and convert_to_deit.py read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import load
from fastvit_ssl.models.vit import ARCH_SPECS

OFFICIAL_ARCHS = ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base")  # vits.py
RENAMES = [  # official (after `module.`) -> ours; the heads first, they sit inside the encoders there
    ("base_encoder.head.", "online.base_projector."),
    ("base_encoder.", "online.base_encoder."),
    ("predictor.", "online.predictor."),
    ("momentum_encoder.head.", "momentum_projector."),
    ("momentum_encoder.", "momentum_encoder."),
]


def is_official(state: dict) -> bool:
    model = state.get("state_dict") if isinstance(state, dict) else None
    return isinstance(model, dict) and any(k.startswith("module.base_encoder.") for k in model)


def rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    raise CheckpointError(f"unexpected tensor {key!r} in a MoCo v3 checkpoint")


def from_official(state: dict, source: str = "checkpoint") -> dict:
    """An official checkpoint -> our checkpoint layout ({"model", "config", "step"}), at 224 px."""
    arch = state.get("arch")
    if arch not in ARCH_SPECS:
        raise CheckpointError(f"{source}: MoCo v3 arch {arch!r}; the official ViTs are {', '.join(OFFICIAL_ARCHS)}")
    model = {rename(k.removeprefix("module."), RENAMES): v for k, v in state["state_dict"].items()}
    cfg = load(None, [f"model.arch={arch}", "method.name=mocov3"])
    return {"model": model, "config": cfg.to_dict(), "step": 0, "official_epoch": state.get("epoch")}


def to_official(state: dict) -> dict:
    """Our MoCo v3 checkpoint -> the official layout (model tensors only; no optimizer)."""
    cfg = state["config"]
    if cfg["method"]["name"] != "mocov3":
        raise CheckpointError(f"a {cfg['method']['name']} checkpoint has no MoCo v3 counterpart")
    back = [(new, old) for old, new in RENAMES]
    model = {"module." + rename(k, back): v for k, v in state["model"].items()}
    return {"arch": cfg["model"]["arch"], "state_dict": model, "step": state.get("step", 0)}


def main(argv: list[str] | None = None) -> Path:
    from fastvit_ssl.eval.encoder import read_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint, run or DeepSpeed folder")
    parser.add_argument("--out", type=Path, required=True, help="FILE.pth.tar for main_lincls.py --pretrained")
    args = parser.parse_args(argv)
    state = read_checkpoint(args.checkpoint)
    if state["config"]["model"]["arch"] not in OFFICIAL_ARCHS or state["config"]["model"]["img_size"] != 224:
        raise CheckpointError(
            f"{args.checkpoint}: {state['config']['model']['arch']} at {state['config']['model']['img_size']} px; "
            f"the official scripts build {', '.join(OFFICIAL_ARCHS)} at 224 px"
        )
    torch.save(to_official(state), args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
