"""Each Triton kernel against its plain-PyTorch reference and, for EMA and LARS, the official MoCo v3 code's
per-parameter loop: median time (and the 20/80 % quantiles), GB/s for the memory-bound kernels, TFLOP/s for the
contrastive logits, the patch projection and BEiT's LM head, and peak memory.

    python benchmarks/kernels.py                                   # CPU: the reference paths only
    python benchmarks/kernels.py --preset gpu --out benchmarks/results/kernels-h100.csv
    python benchmarks/kernels.py --resources --out benchmarks/results/kernel-resources.csv   # no GPU needed

--resources compiles every kernel for sm_80 and sm_90a at its launchers' configurations (fastvit_ssl.kernels.aot)
and lists registers, shared memory, spills and the blocks per SM they allow: the first table to read on a new GPU.

On a CPU the fused kernels would only run through the Triton interpreter, whose speed means nothing: they are left
out and the table says so. Bytes are the ideal traffic of one pass (what a perfect kernel must read and write),
the same for every implementation, so GB/s compares like with like.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from fastvit_ssl import runinfo
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_loss_ref
from fastvit_ssl.models.heads import projector
from fastvit_ssl.models.vit import VisionTransformer
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS
from rows import print_table, write_rows

# Sizes of a realistic step: a ViT's parameter lists (EMA, optimizers) and patch projection, MoCo's logits of
# 4096 queries x 65536 keys gathered from 16 ranks, a batch of 224^2 images.
# BEiT-B's LM head: 256 images x 75 masked tokens per GPU, width 768, 8,192 visual tokens.
PRESETS = {
    "cpu": dict(arch="vit_small", dtype=torch.float32, loss=(256, 1024, 256), images=(8, 224), head=(600, 768, 8192)),
    "gpu": dict(
        arch="vit_base", dtype=torch.bfloat16, loss=(4096, 65536, 256), images=(256, 224), head=(19200, 768, 8192)
    ),
    "gpu-large": dict(
        arch="vit_large", dtype=torch.bfloat16, loss=(4096, 65536, 256), images=(256, 224), head=(19200, 1024, 8192)
    ),
}


def measure(fn, device: torch.device, reps: int = 10) -> tuple[float, float, float, float]:
    """(median ms, 20 % ms, 80 % ms, peak MiB above the start) of fn()."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, low, high, peak
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5], float("nan")


def param_shapes(arch: str) -> list[torch.Size]:
    """The trained tensors of a MoCo v3 base encoder + projector (what EMA and the optimizer touch)."""
    with torch.device("meta"):
        modules = [VisionTransformer(arch, 224), projector(VisionTransformer(arch, 224).embed_dim, 4096, 256)]
    return [p.shape for m in modules for p in m.parameters() if p.requires_grad]


def ema_cases(shapes, device, dtype, fused: bool):
    ema = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    params = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    numel = sum(p.numel() for p in params)

    def official():  # moco/builder.py: param_m.data = param_m.data * m + param_b.data * (1. - m)
        for e, p in zip(ema, params):
            e.data = e.data * 0.99 + p.data * (1.0 - 0.99)

    cases = [("official loop", official), ("reference foreach", lambda: ema_update_ref_(ema, params, 0.99))]
    if fused:
        from fastvit_ssl.kernels.ema import ema_update_

        cases.append(("fused", lambda: ema_update_(ema, params, 0.99)))
    return [
        ("ema", name, fn, f"{len(shapes)} tensors, {numel / 1e6:.1f}M", 3 * numel * ema[0].element_size(), 0)
        for name, fn in cases
    ]


def optimizer_cases(shapes, device, dtype, fused: bool):
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    size = params[0].element_size()
    impls = {"lars": [("reference loop (official)", LARS)], "lamb": [("reference loop", LAMB)]}
    if fused:
        from fastvit_ssl.kernels.lars_lamb import FusedLAMB, FusedLARS

        impls["lars"].append(("fused", FusedLARS))
        impls["lamb"].append(("fused", FusedLAMB))
    ideal = {"lars": numel * (3 * size + 2 * 4), "lamb": numel * (3 * size + 4 * 4)}  # p, g (+ p out), fp32 state
    shape = f"{len(shapes)} tensors, {numel / 1e6:.1f}M"
    return [
        (kernel, name, opt_cls(params, lr=1e-3, weight_decay=0.1).step, shape, ideal[kernel], 0)
        for kernel, cases in impls.items()
        for name, opt_cls in cases
    ]


def contrastive_cases(N, M, D, device, dtype, fused: bool):
    q = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(M, D, device=device, dtype=dtype)
    impls = [("reference (N x M logits)", contrastive_loss_ref)]
    if fused:
        from fastvit_ssl.kernels.contrastive import contrastive_loss

        impls.append(("fused", contrastive_loss))

    def step(fn):
        def run():
            q.grad = None
            fn(q, k, 0.2).backward()

        return run

    flops = 2 * 2 * N * M * D  # logits in the forward, dq in the backward
    return [("contrastive fwd+bwd", name, step(fn), f"N={N} M={M} D={D}", 0, flops) for name, fn in impls]


def patch_embed_cases(B, size, arch, device, dtype, fused: bool):
    from fastvit_ssl.kernels.patch_embed import patch_embed, patch_embed_ref

    vit = VisionTransformer(arch, size).to(device, dtype)
    proj = vit.patch_embed.proj
    images = torch.randn(B, 3, size, size, device=device, dtype=dtype)
    args = (images, proj.weight, proj.bias, vit.pos_embed, vit.patch_embed.patch_size, vit.cls_token.detach())
    impls = [("reference (conv, flatten, cat, add)", patch_embed_ref)] + ([("fused", patch_embed)] if fused else [])
    D, K, L = proj.weight.shape[0], proj.weight[0].numel(), (size // vit.patch_embed.patch_size) ** 2
    flops = 2 * B * L * K * D
    traffic = images.numel() * images.element_size() + B * (L + 1) * D * images.element_size()
    shape = f"B={B} {size}px D={D} P={vit.patch_embed.patch_size}"
    return [("patch embed fwd (frozen)", name, lambda fn=fn: fn(*args), shape, traffic, flops) for name, fn in impls]


def lm_head_cases(N, D, V, device, dtype, fused: bool):
    from fastvit_ssl.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_ref

    x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    b = torch.zeros(V, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    impls = [("reference (N x V logits)", linear_cross_entropy_ref)] + (
        [("fused", linear_cross_entropy)] if fused else []
    )

    def step(fn):
        def run():
            x.grad = w.grad = b.grad = None
            fn(x, w, b, t).backward()

        return run

    flops = 3 * 2 * N * D * V  # logits, dx, dW
    return [("LM head fwd+bwd", name, step(fn), f"N={N} D={D} V={V}", 0, flops) for name, fn in impls]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="CSV file (a .json beside it gets the same rows)")
    parser.add_argument("--resources", action="store_true", help="compile for sm_80/sm_90a and list resources")
    args = parser.parse_args(argv)
    if args.resources:
        return resources(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    fused = device.type == "cuda"
    dtype = preset["dtype"]
    shapes = param_shapes(preset["arch"])
    cases = [
        *ema_cases(shapes, device, dtype, fused),
        *optimizer_cases(shapes, device, dtype, fused),
        *contrastive_cases(*preset["loss"], device, dtype, fused),
        *patch_embed_cases(*preset["images"], preset["arch"], device, dtype, fused),
        *lm_head_cases(*preset["head"], device, dtype, fused),
    ]
    meta = {
        "device": runinfo.device_name(device),
        "commit": runinfo.git_commit(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "dtype": str(dtype).replace("torch.", ""),
    }
    rows = []
    for kernel, impl, fn, shape, traffic, flops in cases:
        median, low, high, peak = measure(fn, device)
        rows.append(
            {
                **meta,
                "kernel": kernel,
                "impl": impl,
                "shape": shape,
                "ms": round(median, 4),
                "ms_p20": round(low, 4),
                "ms_p80": round(high, 4),
                "GB/s": round(traffic / median / 1e6, 1) if traffic else "",
                "TFLOP/s": round(flops / median / 1e9, 2) if flops else "",
                "peak_MiB": "" if peak != peak else round(peak, 1),
            }
        )
        del fn
    print_header(rows, fused)
    print_table(rows, ["kernel", "impl", "shape", "ms", "ms_p20", "ms_p80", "GB/s", "TFLOP/s", "peak_MiB"])
    if args.out:
        write_rows(rows, args.out)
    return rows


def resources(out: Path | None) -> list[dict]:
    from fastvit_ssl.kernels import aot
    from fastvit_ssl.kernels.shapes import CASES

    rows, problems = aot.check(CASES, aot.project_modules(), jobs=os.cpu_count())
    meta = {"commit": runinfo.git_commit(), "triton": triton_version(), "date": datetime.date.today().isoformat()}
    rows = [{**meta, **row} for row in rows]
    columns = ["kernel", "arch", "config", "registers", "shared_bytes", "spill_bytes", "blocks_per_sm", "problem"]
    print_table(rows, columns)
    print("\n".join(["", *problems]) if problems else f"\n{len(rows)} compilations, all within budget")
    if out:
        write_rows(rows, out)
    return rows


def triton_version() -> str:
    import triton

    return triton.__version__


def print_header(rows: list[dict], fused: bool) -> None:
    print(f"{rows[0]['device']} | {rows[0]['dtype']} | commit {rows[0]['commit'][:12]}")
    if not fused:
        print("no CUDA device: fused Triton kernels are not timed (the interpreter's speed means nothing)")


if __name__ == "__main__":
    main()
