"""The DeepSpeed engine: ZeRO stage 0-3 and bf16 (or fp16 with DeepSpeed's dynamic loss scaling, on GPUs) through
`deepspeed.initialize`, the same interface as LocalEngine.

DeepSpeed wraps only the method's trained module (`online`: for MoCo v3 base encoder, projector, predictor). The
EMA networks (momentum encoder and projector, SiT's teacher) stay outside, as an fp32 replica on every rank: in
bf16 storage an EMA with m -> 1 would lose its updates (1 - m is below bf16's resolution), and the target forward
pass needs all their weights anyway. Every step they move towards the engine's current trained weights:
- ZeRO 0/1/2: the base weights are whole on every rank; the EMA reads them directly.
- ZeRO-3: the base weights are partitioned; they are gathered one transformer block at a time
  (deepspeed.zero.GatheredParameters) for the EMA, so the transient cost is one block's weights.
Memory cost of the replica: 4 bytes per momentum parameter on every GPU (ViT-L 1.3 GB, ViT-H 2.6 GB with projector).

LARS and LAMB see ZeRO's flat partitions; `zero_layout` tells them which fragment of which original tensor each
partition holds, so their trust ratios are per tensor (optim/trust_ratio.py). AdamW needs no layout.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from fastvit_ssl import checkpoint, distributed
from fastvit_ssl.config import Config
from fastvit_ssl.engine.local import layer_groups
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.base import Method, no_mark
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models.vit import begin_graph_step
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.schedules import Hyperparameters, set_hyperparameters
from fastvit_ssl.optim.trust_ratio import Fragment, TrustRatioOptimizer

log = logging.getLogger(__name__)
META = "fastvit_ssl.json"  # written last into each checkpoint folder: its presence marks the checkpoint complete


class DeepSpeedEngine:
    """Args:
    model: the method on `device` (fp32); its `online` module is handed to DeepSpeed.
    cfg: the run's config (engine.zero_stage, run.precision, optim.*).
    device: this rank's device.
    ops: fused or reference kernels (LARS/LAMB class, EMA).
    """

    def __init__(self, model: Method, cfg: Config, device: torch.device, ops: Ops):
        import deepspeed

        distributed.init_single_process(device)  # `python train.py engine.name=deepspeed`: a group of one
        self.model, self.device, self.stage, self.cfg = model, device, cfg.engine.zero_stage, cfg
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision, torch.float32)
        self.overflows = 0  # fp16 steps DeepSpeed's loss scaler skipped
        client_optimizer = build_optimizer(cfg.optim, model.param_groups(), ops)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model.online, optimizer=client_optimizer, config=to_deepspeed(cfg, distributed.world_size())
        )
        if isinstance(client_optimizer, TrustRatioOptimizer) and self.optimizer is not client_optimizer:
            params = list(model.online.parameters())
            client_optimizer.partition_like_zero(zero_layout(self.optimizer, params), len(params))
        self.mark = no_mark  # the phase hook (methods/base.py); the benchmarks set theirs

    def step(self, views: list[torch.Tensor], step: int, hparams: Hyperparameters):
        """Training iteration `step` on this rank's share of the global batch: (detached metrics, finite). A
        non-finite loss skips backward and update; a non-finite gradient makes ZeRO skip the update itself
        (bf16.check_grad_overflow, set explicitly) and report an infinite norm, which counts as a non-finite step;
        in fp16 an overflow of the scaled gradients is the loss scaler's business (skipped, counted in `overflows`,
        the scale lowered), not a non-finite step. Either way the BN running statistics are restored, as the local
        engine does."""
        views = [v.to(self.device, non_blocking=True) for v in views]
        begin_graph_step()
        set_hyperparameters(self.optimizer, hparams)
        buffers = [b.clone() for b in self.model.buffers()]  # BN running statistics: small
        self.mark("data")
        losses = self.model.step_losses(views, step, hparams, self.forward_online, self.update_ema, mark=self.mark)
        loss = losses["loss"]
        finite = bool(distributed.all_reduce_mean(torch.isfinite(loss).float()) == 1)  # every rank decides alike
        layer_norms = {}
        if finite:
            self.ds.backward(loss)
            self.mark("backward")
            layer_norms = self.grad_norms_by_layer()  # before step: ZeRO frees the gradients there
            self.ds.step()
        norm = self.ds.get_global_grad_norm() if finite else None
        grad_norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        overflow = finite and self.dtype == torch.float16 and not self.ds.was_step_applied()
        if overflow or not (finite and bool(torch.isfinite(grad_norm))):
            torch._foreach_copy_(list(self.model.buffers()), buffers)
        self.overflows += overflow
        finite = finite and (overflow or bool(torch.isfinite(grad_norm)))
        self.mark("optimizer")
        return {**losses, "loss": loss.detach(), "grad_norm": grad_norm, **layer_norms}, finite

    def grad_norms_by_layer(self) -> dict[str, torch.Tensor]:
        """The local engine's per-layer gradient norms, read from ZeRO's partitions: each rank sums the squares of
        the gradient elements it owns, one all-reduce adds them up. No host sync."""
        groups = layer_groups(self.model)
        zero = torch.zeros((), device=self.device)
        squares = torch.stack([sum((self._owned_grad_square(p) for p in ps), zero) for ps in groups.values()])
        scale = getattr(self.ds.optimizer, "loss_scale", 1.0) if self.dtype == torch.float16 else 1.0  # fp16: scaled
        return dict(zip(groups, distributed.all_reduce_sum(squares).sqrt() / scale))

    def _owned_grad_square(self, p: torch.nn.Parameter) -> torch.Tensor | float:
        """Sum of squares of the reduced gradient elements of `p` that this rank owns."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(p)
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2 and the bf16 optimizer: this rank's fragment, if any
            mapping = p._hp_mapping
            if mapping is None:
                return 0.0
            grad = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
            if grad.numel() == p.numel():  # a full buffer on every rank: count only the fragment owned here
                grad = grad.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
        else:  # stage 0 in fp32: every rank holds the whole reduced gradient; rank 0 counts it
            grad = p.grad if distributed.is_main() else None
        return 0.0 if grad is None else grad.detach().float().square().sum()

    def forward_online(self, *inputs: torch.Tensor):
        """The engine's module on inputs in its dtype (uint8 images stay), outputs back in fp32 for the losses."""
        outputs = self.ds(*(x.to(self.dtype) if x.is_floating_point() else x for x in inputs))
        return tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, outputs)

    def evaluation_model(self) -> Method | None:
        """The method whole, for rank 0's evaluations and pictures; called by every rank (None on the others).
        Under ZeRO-3 the trained parameters are partitioned: every rank lends its partitions while rank 0 copies
        them into a fresh method (the engine's own module, run on one rank, would wait for the others' hooks)."""
        if self.stage < 3:
            return self.model if distributed.is_main() else None
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.online.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().clone() for k, v in self.model.state_dict().items()} if distributed.is_main() else None
            )
        if state is None:
            return None
        whole = build_method(self.cfg, REFERENCE_OPS).to(self.device)
        whole.load_state_dict(state)
        return whole

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        if self.stage < 3:
            self.model.update_ema(momentum)
            return
        import deepspeed

        for pairs in _by_block(self.model):
            with deepspeed.zero.GatheredParameters([b for _, b, _ in pairs], modifier_rank=None):
                self.model.ema_fn([m for _, _, m in pairs], [b for _, b, _ in pairs], momentum)

    def checkpoints(self, run_dir: Path) -> list[Path]:
        """Complete DeepSpeed checkpoint folders, oldest first."""
        root = run_dir / "deepspeed"
        return sorted(p for p in root.glob("step*") if (p / META).is_file()) if root.is_dir() else []

    def save(self, run_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
        """All ranks write their ZeRO shards; rank 0 adds the EMA networks and, last, the meta file."""
        root, tag = run_dir / "deepspeed", f"step{step:08d}"
        momentum = {k: v for k, v in self.model.state_dict().items() if not k.startswith("online.")}
        self.ds.save_checkpoint(str(root), tag=tag, client_state={**client_state, "momentum": momentum})
        if distributed.is_main():
            (root / tag / META).write_text(json.dumps({"step": step, "config": client_state["config"]}))
            for old in self.checkpoints(run_dir)[: -keep_last or None]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return root / tag

    def load(self, path: Path, config: dict) -> dict:
        meta = json.loads((path / META).read_text())
        checkpoint.check_compatible(meta["config"], config, path)
        _, client_state = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if client_state is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load {path}")
        self.model.load_state_dict(client_state.pop("momentum"), strict=False)
        return client_state


def zero_layout(zero_optimizer, params: list[torch.Tensor]) -> dict[int, list[Fragment]]:
    """{id(flat fp32 partition): fragments of the original tensors it holds on this rank}."""
    key = {id(p): i for i, p in enumerate(params)}
    layout: dict[int, list[Fragment]] = defaultdict(list)
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: every tensor is split over all ranks
        for flat, group in zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups):
            start = 0
            for p in group:
                layout[id(flat)].append(Fragment(key[id(p)], start, p.partition_numel(), len(p.ds_shape) > 1))
                start += p.partition_numel()
        return dict(layout)
    # ZeRO-1/2 and DeepSpeed's bf16 optimizer: each bit16 tensor knows its fragment of the fp32 partition
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    groups = getattr(zero_optimizer, "bit16_groups", None)
    if flats is None:
        flats, groups = zero_optimizer.fp32_groups_flat_partition, zero_optimizer.bf16_groups
    for flat, group in zip(flats, groups):
        for p in group:
            if getattr(p, "_hp_mapping", None) is not None:
                address = p._hp_mapping.get_hp_fragment_address()
                layout[id(flat)].append(Fragment(key[id(p)], address.start, address.numel, p.ndim > 1))
    return dict(layout)


def _by_block(model: Method):
    """(name, base, momentum) EMA pairs grouped by transformer block (`...blocks.<i>.`; one group for the rest)."""
    groups = defaultdict(list)
    names = {id(p): n for n, p in model.named_parameters()}
    for base, mom in model.ema_pairs():
        parts = names[id(base)].split(".")
        block = ".".join(parts[: parts.index("blocks") + 2]) if "blocks" in parts else "rest"
        groups[block].append((names[id(base)], base, mom))
    return list(groups.values())


def to_deepspeed(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from ours (never kept as a second, hand-edited copy).

    No gradient accumulation: a contrastive method's negatives are the keys of one forward pass, so accumulating
    micro-batches would train with fewer negatives than the batch size says; the global batch is one step over all
    ranks.
    """
    ds = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # ZeRO skips an update whose gradients are not finite; explicit, the engine reports it to the NaN guard
        "bf16": {"enabled": cfg.run.precision == "bf16", "check_grad_overflow": True},
        # dynamic loss scaling as torch's GradScaler: from 2^16, halved at each overflow, doubled after 2,000 clean
        # steps
        "fp16": {
            "enabled": cfg.run.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 2000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        },
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "gradient_clipping": cfg.optim.clip_grad,  # always explicit: DeepSpeed's default (1.0) would clip silently
        "zero_allow_untested_optimizer": True,  # LARS/LAMB: ZeRO-correct through optim/trust_ratio.py
        "steps_per_print": 2**31 - 1,  # our monitor prints
        "wall_clock_breakdown": False,
    }
    return ds
