"""What one training step costs a GPU, counted on a CPU: for each phase of the step (data, prepare, forward, EMA,
targets, loss, backward, optimizer), the aten ops dispatched, the device kernel launches they imply, the bytes they
read and write, their FLOPs and the host-device syncs, for our path (fused) and the official code's way (baseline),
at real sizes and without memory: every tensor lives on the `meta` device.

    python benchmarks/step_cost.py                                   # MoCo v3, ViT-S/B/L, batch 256, 224 px, bf16
    python benchmarks/step_cost.py --arch vit_huge --batch 128 --gpu A100
    python benchmarks/step_cost.py --out benchmarks/results/step-cost.csv

How each number is made (a model of the GPU, not a measurement):
- Ours is the engine's own training step (benchmarks/throughput.py's Ours: what train.py runs), the baseline the
  official code's (baseline.py), each run under a TorchDispatchMode that sees every aten op, phases marked from
  inside the step. Attention is counted as the flash kernel SDPA picks on CUDA in bf16 or fp16 (the baseline's
  pinned form, timm 0.4.9's plain ops, as those ops); AdamW as torch's fused kernel (ours) or its foreach kernels
  (baseline: torch's CUDA default).
- Autocast (bf16 ours, fp16 baseline) is emulated below autograd, as CUDA's autocast casts: matrix products,
  convolutions and attention take low-precision operands (the casts counted, each tensor cast once per step as
  autocast's cache and saved copies allow), norms, softmax and losses fp32.
- Launches: 0 for views and allocations; 1 for an ordinary op; torch's multi-tensor-apply chunking for _foreach_/
  _fused_ ops (110/64/48/36/30 tensors by list depth, 320 blocks of 65,536 elements); 3 for a flash-attention
  backward; one per requested gradient for convolution and layer-norm backwards; 1 per Triton launch (recorded,
  not run, with the launcher's configuration for --gpu).
- Bytes: each distinct tensor an op reads and each it writes, once: the traffic of a perfect cache, a lower bound.
- FLOPs: torch.utils.flop_counter's formulas for aten ops; for the Triton kernels the same products' counts.
- Time bounds at a datasheet peak (bandwidth B, FLOP rate F): per op max(bytes / B, FLOPs / F), summed: no GPU can
  run the step faster than that. Launches x 2 us is the host time to issue them when the step is launch-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from baseline import MODERN, PINNED
from throughput import Bench, Setup
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastvit_ssl import runinfo
from fastvit_ssl.config import DEFAULT_METHOD
from fastvit_ssl.kernels import ema as ema_kernel
from fastvit_ssl.kernels import lars_lamb as lars_lamb_kernel
from fastvit_ssl.kernels import linear_ce as linear_ce_kernel
from fastvit_ssl.kernels import patch_embed as patch_embed_kernel
from fastvit_ssl.kernels.aot import recording
from fastvit_ssl.kernels.target import A100, H100, planning_for
from fastvit_ssl.methods.base import METHODS, PHASES
from rows import print_table, write_rows

aten = torch.ops.aten
GPUS = {  # datasheet peaks (SXM, dense bf16), and the target the launchers plan for
    "A100": dict(target=A100, bandwidth=2.039e12, flops=312e12),
    "H100": dict(target=H100, bandwidth=3.35e12, flops=989e12),
}
LAUNCH_US = 2.0  # host time to issue one kernel launch (CUDA runtime + PyTorch dispatch), typical
LOW_PRECISION = {  # autocast runs these in bf16/fp16 (their backward ops take the same operands)
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    aten.convolution_backward.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_backward.default,
}
FULL_PRECISION = {aten.native_layer_norm.default, aten.mse_loss.default, aten.nll_loss_forward.default}  # ... fp32
UPCAST_INSIDE = {  # ... fp32 math inside the kernel (autocast passes dtype=float32): no cast kernel
    aten._softmax.default,
    aten._log_softmax.default,
    aten.linalg_vector_norm.default,
    aten.sum.dim_IntList,
}
ALLOCATIONS = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}
FREE = {aten._unsafe_view.default, aten.lift_fresh.default, *ALLOCATIONS}  # no kernel: metadata or allocation
MAX_TENSORS = (110, 64, 48, 36, 30)  # torch's multi_tensor_apply: tensors per launch by list depth 1-5


def multi_tensor_launches(lists: list[list[torch.Tensor]]) -> int:
    """Launches of one _foreach_/_fused_ op over `lists` (the same length each), chunked as torch's CUDA
    multi_tensor_apply: a launch when the tensor table or the block table is full, a partly done tensor carried."""
    max_tensors = MAX_TENSORS[min(len(lists), 5) - 1]
    launches = tensors = blocks = 0
    for t in lists[0]:
        tensors += 1
        chunks = math.ceil(t.numel() / 65536)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if blocks == 320 or (last and tensors == max_tensors):
                launches, blocks = launches + 1, 0
                tensors = 0 if last else 1
    return launches + (blocks > 0)


def tensors_in(values) -> list[torch.Tensor]:
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found += tensors_in(v)
    return found


def traffic(read: list[torch.Tensor], written: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors read and of those written (an in-place op's tensor counts as both)."""
    read_once = {id(t): t for t in read}
    written_once = {id(t): t for t in written}
    return sum(t.numel() * t.element_size() for t in [*read_once.values(), *written_once.values()])


def written_in_place(func, args) -> list[torch.Tensor]:
    """What an in-place _foreach_/_fused_ op (they return nothing) writes: its first list; fused Adam(W) also its
    two moment lists."""
    lists = [list(a) for a in args if isinstance(a, (list, tuple))]
    if func.overloadpacket.__name__.startswith("_fused_adam"):
        return lists[0] + lists[2] + lists[3]
    return lists[0]


def triton_flops(kernel, args: tuple) -> float:
    """Multiply-adds x 2 of the project's matrix-product kernels; 0 for the memory-bound ones."""
    a = dict(zip(kernel.arg_names, args))
    name = kernel.__name__
    if name == "_contrastive_fwd_kernel":  # logits q k^T
        return 2.0 * a["N"] * a["M"] * a["D"]
    if name == "_contrastive_bwd_kernel":  # logits again, then their weights times k
        return 4.0 * a["N"] * a["M"] * a["D"]
    if name == "_patch_embed_fwd_kernel":
        return 2.0 * a["R"] * a["D"] * a["K"]
    if name == "_patch_embed_bwd_kernel":
        return 2.0 * a["RP"] * a["D"] * a["K"]
    return 0.0


@dataclass
class Cost:
    ops: int = 0
    launches: int = 0
    bytes: int = 0
    flops: float = 0.0
    syncs: int = 0
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # GPU name -> roofline lower bound

    def add(self, launches: int, nbytes: int, flops: float, ops: int = 1) -> None:
        self.ops += ops
        self.launches += launches
        self.bytes += nbytes
        self.flops += flops
        for gpu, peak in GPUS.items():
            self.seconds[gpu] += max(nbytes / peak["bandwidth"], flops / peak["flops"])

    def merge(self, other: Cost) -> None:
        for name in ("ops", "launches", "syncs", "bytes", "flops"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for gpu, s in other.seconds.items():
            self.seconds[gpu] += s


class StepCounter(TorchDispatchMode):
    """Counts what the ops dispatched in it would cost on a GPU, into `pending` until `close(phase)`; emulates
    autocast to `dtype` (see the module docstring)."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype, self.casts = dtype, {}
        self.fresh = {}  # allocated, not yet written by an op: a Triton kernel's outputs
        self.tables = {}  # multi-tensor address tables -> the tensors they point to
        self.pending, self.phases = Cost(), defaultdict(Cost)

    def cast(self, t, dtype, counted: bool = True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if not counted:
            return t.to(dtype)
        if id(t) not in self.casts:  # autocast caches a weight's copy; backward reuses the copies it saved
            copy = t.to(dtype)
            self.casts[id(t)] = (t, copy)
            self.pending.add(1, traffic([t], [copy]), 0.0)
        return self.casts[id(t)][1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = args  # what the kernel reads: the upcast-inside ops read their low-precision inputs
        if self.dtype is not None and func in LOW_PRECISION | FULL_PRECISION | UPCAST_INSIDE:
            dtype = self.dtype if func in LOW_PRECISION else torch.float32
            args = torch.utils._pytree.tree_map(lambda t: self.cast(t, dtype, func not in UPCAST_INSIDE), args)
            read = read if func in UPCAST_INSIDE else args
        on_device = any(t.is_meta for t in tensors_in([*args, *kwargs.values()]))
        if func is aten._local_scalar_dense.default:
            if on_device:  # .item() of a device tensor: the host waits for the device
                self.pending.syncs += 1
                self.pending.ops += 1
                return 1  # a count of steps, a flag: 1 keeps the Python code on its usual path
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if on_device or any(t.is_meta for t in tensors_in([out])):  # host tensors' ops (CPU step counts): free
            self.count(func, read, kwargs, out)
        return out

    def count(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        inputs, outputs = tensors_in([*args, *kwargs.values()]), tensors_in([out])
        if func in FREE or func.is_view or func.namespace == "profiler":
            if func in ALLOCATIONS:
                self.fresh[id(out)] = out
            self.pending.add(0, 0, 0.0)
            return
        if name.endswith("_") and out is None:
            outputs = written_in_place(func, args)
        if name.startswith(("_foreach_", "_fused_", "_amp_foreach")):
            lists = [v for v in args if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)]
            if not name.endswith("_") and isinstance(out, (list, tuple)) and out:
                lists.append(list(out))
            launches = multi_tensor_launches(lists)
        elif func is aten._scaled_dot_product_flash_attention_backward.default:
            launches = 3  # dot(dO, O), the main kernel, dQ's conversion
        elif func in (aten.convolution_backward.default, aten.native_layer_norm_backward.default):
            launches = sum(bool(m) for m in args[-1])  # one per gradient asked for
        else:
            launches = 1
        formula = flop_registry.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0.0
        self.pending.add(launches, traffic(inputs, outputs), float(flops))

    @contextlib.contextmanager
    def seeing_address_tables(self):
        """Remember which tensors each multi-tensor kernel's address table points to."""

        def remembering(make):
            def address_table(tensors, device):
                table = make(tensors, device)
                self.tables[id(table)] = (table, list(tensors))
                return table

            return address_table

        with contextlib.ExitStack() as stack:
            for module in (ema_kernel, lars_lamb_kernel):
                stack.enter_context(mock.patch.object(module, "address_table", remembering(module.address_table)))
            yield

    def count_triton(self, calls: list) -> None:
        """The Triton launches recorded since the last call, one kernel each: it reads its tensor arguments and
        those of its address tables, and writes the tensors allocated for it and those of its first table."""
        for kernel, args, _ in calls:
            read, written = [], []
            for t in tensors_in(args):
                if id(t) in self.tables:  # in place through the first table: read and written
                    pointed = self.tables[id(t)][1]
                    written += [] if written else pointed
                    read += pointed
                elif id(t) in self.fresh:
                    written.append(self.fresh.pop(id(t)))
                else:
                    read.append(t)
            self.pending.add(1, traffic(read, written), triton_flops(kernel, args))
        calls.clear()

    def close(self, phase: str) -> None:
        self.phases[phase].merge(self.pending)
        self.pending = Cost()


def flash_sdpa(q, k, v, *args, **kwargs):
    """SDPA as CUDA runs it in bf16/fp16 for a ViT: the flash kernel."""
    return aten._scaled_dot_product_flash_attention(q, k, v)[0]


def step_without_overflow(scaler, optimizer, optimizer_state, *args, **kwargs):
    """GradScaler's step as it runs when no gradient overflowed: it reads the flags (a sync), then steps."""
    sum(v.item() for v in optimizer_state["found_inf_per_device"].values())
    return optimizer.step(*args, **kwargs)


def emulated_dtypes(autocast_dtype, weight, pos_embed) -> tuple[torch.dtype, torch.dtype]:
    """The fused patch embedding's (products, output) dtypes under the autocast StepCounter emulates."""
    compute = autocast_dtype or weight.dtype
    return compute, torch.promote_types(compute, pos_embed.dtype)


@contextlib.contextmanager
def as_on_cuda(autocast_dtype: torch.dtype | None):
    """Meta tensors take CUDA's paths: flash attention, fused and foreach optimizers, autocast output dtypes."""
    devices = ["cuda", "meta"]
    with (
        mock.patch.object(F, "scaled_dot_product_attention", flash_sdpa),
        mock.patch("torch.optim.optimizer._get_fused_kernels_supported_devices", lambda: devices),
        mock.patch("torch.optim.optimizer._get_foreach_kernels_supported_devices", lambda: devices),
        mock.patch.object(patch_embed_kernel, "_dtypes", lambda w, pos: emulated_dtypes(autocast_dtype, w, pos)),
        mock.patch.object(linear_ce_kernel, "_compute_dtype", lambda x, w: autocast_dtype or w.dtype),
        mock.patch.object(torch.amp.GradScaler, "_maybe_opt_step", step_without_overflow),
    ):
        yield


def count_step(setup: Setup, gpu: str) -> dict[str, Cost]:
    """Per-phase cost of one training step of `setup` (after a first step that creates the optimizer state)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.precision)
    # ours builds in fp32 (autocast has no meta device) and StepCounter emulates its bf16; the baseline keeps its
    # GradScaler and leaves autocast out on meta itself
    built = setup if setup.baseline else replace(setup, precision="fp32")
    with as_on_cuda(dtype), planning_for(GPUS[gpu]["target"]), recording() as calls:
        bench = Bench(built, torch.device("meta"))
        optimizer = bench.impl.optimizer
        if isinstance(optimizer, torch.optim.AdamW):  # torch's CUDA choice: fused (ours), foreach (its default)
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = not setup.baseline, setup.baseline
        with StepCounter(dtype):
            bench.step()  # optimizer state, autocast's first casts
        calls.clear()
        counter = StepCounter(dtype)

        def mark(phase: str) -> None:
            counter.count_triton(calls)
            counter.close(phase)

        bench.impl.mark = mark
        with counter, counter.seeing_address_tables():
            bench.step()
    return dict(counter.phases)


def rows_for(method: str, arch: str, batch: int, img_size: int, gpu: str) -> list[dict]:
    rows = []
    ours = Setup(arch, batch, img_size, "bf16", "fused", method=method)
    baselines = [replace(ours, baseline=True, precision="fp16", attention=form) for form in (PINNED, MODERN)]
    for setup in (ours, *baselines):
        phases = count_step(setup, gpu)
        total = Cost()
        for cost in phases.values():
            total.merge(cost)
        for phase, cost in [*((p, phases.get(p, Cost())) for p in PHASES), ("step", total)]:
            rows.append(
                {
                    "mode": "baseline" if setup.baseline else "ours",
                    "form": setup.form,
                    "method": method,
                    "arch": arch,
                    "batch": batch,
                    "img_size": img_size,
                    "precision": setup.precision,
                    "phase": phase,
                    "aten_ops": cost.ops,
                    "launches": cost.launches,
                    "GB": round(cost.bytes / 1e9, 3),
                    "GFLOP": round(cost.flops / 1e9, 1),
                    "bytes": cost.bytes,
                    "FLOPs": int(cost.flops),
                    "syncs": cost.syncs,
                    **{f"{g}_bound_ms": round(cost.seconds[g] * 1e3, 2) for g in GPUS},
                    "launch_ms": round(cost.launches * LAUNCH_US / 1e3, 2),
                }
            )
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    parser.add_argument("--arch", nargs="+", default=["vit_small", "vit_base", "vit_large"])
    parser.add_argument("--batch", type=int, default=256, help="per GPU (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="(default: %(default)s)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="configs the launchers pick")
    parser.add_argument("--out", type=Path, help="CSV (and a .json beside it)")
    args = parser.parse_args(argv)
    meta = {"commit": runinfo.git_commit(), "date": datetime.date.today().isoformat(), "planned_for": args.gpu}
    rows = []
    for arch in args.arch:
        rows += [{**r, **meta} for r in rows_for(args.method, arch, args.batch, args.img_size, args.gpu)]
    print_table(
        [r for r in rows if r["phase"] != "data"],
        ["form", "arch", "phase", "aten_ops", "launches", "GB", "GFLOP", "syncs", "A100_bound_ms", "H100_bound_ms"],
    )
    steps = [r for r in rows if r["phase"] == "step"]
    for ours in (r for r in steps if r["mode"] == "ours"):
        for base in (r for r in steps if r["mode"] == "baseline" and r["arch"] == ours["arch"]):
            print(
                f"{ours['method']} {ours['arch']} batch {ours['batch']}, ours vs {base['form']}: launches "
                f"{ours['launches']} vs {base['launches']} ({ours['launches'] / base['launches']:.2f}x), "
                f"{ours['GB']} vs {base['GB']} GB ({ours['GB'] / base['GB']:.2f}x), H100 bound "
                f"{ours['H100_bound_ms']} vs {base['H100_bound_ms']} ms (a model, not a measurement)"
            )
    if args.out:
        write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
