"""The pre-trained base encoder out of any checkpoint this project writes, in one place for every evaluation.

Accepted: a local-engine checkpoint (ckpt-*.pt, DDP runs included), a consolidated DeepSpeed checkpoint, a
DeepSpeed checkpoint folder or run folder (consolidated on the fly), a run folder of the local engine (its newest
checkpoint), or a checkpoint of a method's official code (Method.is_official: e.g. MoCo v3's). The encoder's weights
are the keys under the method's backbone (Method.backbone_name; older `module.` prefixes stripped).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fastvit_ssl import checkpoint
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import Config, from_dict
from fastvit_ssl.data.build import resolve_root
from fastvit_ssl.data.folder import labelled_root
from fastvit_ssl.methods.base import METHODS, method_class
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.vit import VisionTransformer

# Evaluations run wherever they are asked to: the attention kernel is torch's choice there, not the one training
# used (a kernel does not change the model).
EVAL_KERNELS = {"attention": "auto"}


def random_encoder(cfg: Config, **overrides) -> VisionTransformer:
    """The randomly initialised encoder a run started from (the same seeded draw), the baseline of evaluations."""
    torch.manual_seed(cfg.run.seed)
    return build_encoder(cfg, **(EVAL_KERNELS | overrides))


def eval_root(cfg: Config, data: Path | None) -> Path:
    """The folder with the labelled train/ and val/ an evaluation reads: `data` (--data), else the run's data.root,
    else the demo data set under run.out_dir (relative: the current folder), which is written on first use and then
    said on stderr, as train.py logs it."""
    if data is not None:
        return labelled_root(data)
    demo = Path(cfg.run.out_dir) / "demo_data"  # where resolve_root writes it when data.root is empty
    writes_demo = not cfg.data.root and not (demo / "COMPLETE").exists()
    root = resolve_root(cfg)
    if writes_demo:
        print(
            f"wrote the demo data set (5,000 MNIST digits as JPEG) to {root}: the checkpoint's data.root is empty "
            "(--data reads another folder)",
            file=sys.stderr,
        )
    return labelled_root(root)


def read_checkpoint(path: Path) -> dict:
    """The local-format state of `path` (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "deepspeed").is_dir() or path.name.startswith("step"):
            from fastvit_ssl.engine.consolidate import consolidate, find_checkpoint

            with tempfile.TemporaryDirectory() as tmp:
                return checkpoint.load(consolidate(find_checkpoint(path), Path(tmp) / "consolidated.pt"))
        found = checkpoint.list_checkpoints(path)
        if not found:
            raise CheckpointError(
                f"{path} holds no complete checkpoint (ckpt-*.pt beside its .sha256 file, or deepspeed/step*); "
                "a ckpt-*.pt without its .sha256 was never finished. Point --checkpoint at a run folder or a file"
            )
        path = found[-1]
    state = checkpoint.load(path)
    official = [m for m in METHODS.values() if m.is_official(state)]  # a checkpoint of a method's official code
    return official[0].from_official(state, str(path)) if official else state


def encoder_state(model_state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors with their ViT names, out of the state of a `method` model."""
    prefix = method_class(method).backbone_name + "."
    out = {}
    for key, value in model_state.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    if not out:
        raise CheckpointError(f"no {prefix}* tensors: not a fastvit_ssl {method} checkpoint")
    return out


def load_weights(encoder: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names what does not fit."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
            f"shape {'; '.join(wrong[:4])} (checkpoint vs model)" if wrong else "",
        ]
        raise CheckpointError(
            f"{source} does not fit a {encoder.arch} at {encoder.patch_embed.img_size}px: "
            + "; ".join(p for p in parts if p)
        )
    encoder.load_state_dict(state)


def adapt_state(
    state: dict[str, torch.Tensor], encoder: VisionTransformer, pretrained_norm: str = "drop"
) -> dict[str, torch.Tensor]:
    """Pre-training weights for an encoder built differently for fine-tuning (BEiT's recipe): a shared relative
    position bias is copied into every block's own and the [MASK] token dropped. The final norm of the normed
    tokens, which mean pooling does not have: "drop" (BEiT's official fine-tuning loads by name, so the norm of the
    mean, fc_norm, starts at weight 1 and bias 0), or "fc_norm" (it becomes the norm of the mean)."""
    if pretrained_norm not in ("drop", "fc_norm"):
        raise ValueError(f"pretrained_norm={pretrained_norm!r} must be drop or fc_norm")
    state, own, shared_key = dict(state), encoder.state_dict(), "rel_pos_bias.relative_position_bias_table"
    if shared_key in state and shared_key not in own:
        shared = state.pop(shared_key)
        for i in range(len(encoder.blocks)):
            state.setdefault(f"blocks.{i}.rel_pos_bias.relative_position_bias_table", shared.clone())
    if "mask_token" not in own:
        state.pop("mask_token", None)
    if "fc_norm.weight" in own and "norm.weight" not in own:
        for name in ("weight", "bias"):
            norm = state.pop(f"norm.{name}", None)
            if pretrained_norm == "fc_norm" and norm is not None:
                state[f"fc_norm.{name}"] = norm
            else:
                state.setdefault(f"fc_norm.{name}", own[f"fc_norm.{name}"])  # as built: 1 and 0
    return state


def load_encoder(
    path: Path, layout: Callable[[Config], dict] | None = None, pretrained_norm: str = "drop", **overrides
):
    """(pre-trained encoder, the config it was trained with); `overrides` go to VisionTransformer (e.g. drop path),
    and so do those `layout(config)` returns (e.g. BEiT's fine-tuning layout: see adapt_state, which also takes
    `pretrained_norm`)."""
    state = read_checkpoint(path)
    cfg = from_dict(state["config"])
    encoder = build_encoder(cfg, **(EVAL_KERNELS | overrides | (layout(cfg) if layout else {})))
    weights = adapt_state(encoder_state(state["model"], cfg.method.name), encoder, pretrained_norm)
    load_weights(encoder, weights, str(path))
    return encoder, cfg
