"""End-to-end training throughput of a method (MoCo v3; SiT or BEiT with --method): images/s, step time, model
TFLOP/s and MFU, peak memory and a per-phase breakdown, for our path and for `--baseline`, the way the official
code trains.

    python benchmarks/throughput.py --arch vit_small --batch 32                    # our path
    python benchmarks/throughput.py --arch vit_small --batch 32 --baseline         # the official code's way
    python benchmarks/throughput.py --method sit --compare --arch vit_demo --img-size 28
    python benchmarks/throughput.py --compare --arch vit_demo --img-size 28        # both, and their ratio
    python benchmarks/throughput.py --suite --method all --out benchmarks/results/throughput-h100.csv   # GPU

Ours: fused Triton kernels (CUDA), multi-tensor EMA, bf16 autocast, fused AdamW. Baseline (moco-v3/main_moco.py +
builder.py, or SiT's main.py): fp16 autocast with GradScaler, a per-parameter EMA loop, the materialised N x M
logits, conv patch embedding, torch's default AdamW. Both run the method's own step (methods/base.py), opened up
into phases. Attention is torch's SDPA in both (what timm uses); --attention picks its backend.

FLOPs of one step, counted analytically (multiply-adds x 2), for B images, two views, T tokens, width D, depth L,
MLP heads of widths (D -> H -> H -> d) and (d -> H -> d), N local and M gathered keys:
    encoder forward per view  F = B (L (24 T D^2 + 4 T^2 D) + 2 T C P^2 D)     (qkv, proj, 4x MLP; QK^T, AV; patches)
    heads forward per view    G = 2 B (D H + H H + H d) + 2 B (d H + H d)        (projector + predictor)
    step = 2 views x [3 (F + G) (base fwd + bwd) + (F + G_projector) (momentum fwd)] + 2 x 3 x 2 N M d (loss)
SiT, both views in one batch, contrastive head Gc = 2 B (D H + H H + H d), pixel head R = 2 B (T - 1) (3 D^2 + 3 D P^2):
    step = 2 views x [3 (F + Gc + R) (student fwd + bwd) + (F + Gc) (teacher fwd)] + 2 x 3 x 2 N M d (loss)
BEiT, one view, K masked tokens per image, vocabulary V (8,192, DALL-E's; its frozen encoder is not counted):
    step = 3 F + 3 x 2 B K D V
MFU = model FLOP/s / peak FLOP/s, the peak taken from a large matrix product measured on the same device (bf16 on
CUDA, fp32 on CPU), not a datasheet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastvit_ssl import runinfo
from fastvit_ssl.config import load
from fastvit_ssl.data.build import build_train_data, endless_batches
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, select_ops
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models.vit import ARCH_SPECS
from fastvit_ssl.optim.build import build_optimizer
from rows import print_table, write_rows

# --suite: (method, arch, batch per GPU) at the batch sizes the GPU configs use per H100
SUITE = [
    ("mocov3", "vit_small", 256),
    ("mocov3", "vit_base", 128),
    ("mocov3", "vit_large", 64),
    ("sit", "vit_small", 128),
]
ATTENTION = {
    "default": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
PHASES = ("data", "prepare", "forward", "ema", "targets", "loss", "backward", "optimizer")
BEIT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "beit_vit_base.yaml"  # BEiT's model options


@dataclass
class Setup:
    arch: str
    batch: int
    img_size: int
    precision: str  # fp32 | bf16 | fp16 (AMP with GradScaler)
    kernels: str  # fused | reference
    attention: str
    baseline: bool
    data: Path | None = None  # an ImageFolder root (with train/); None: synthetic tensors on the device
    backend: str = "auto"
    uint8_views: bool = False  # ours only: [B, S, S, 3] uint8 views, normalised inside the patch embedding
    method: str = "mocov3"
    compile: bool = False  # ours only: model.compile (torch.compile of the encoder blocks)


def random_dalle_tokenizer(cfg):
    """BEiT's tokenizer for timing: DALL-E's encoder (its full cost) with random weights."""
    from fastvit_ssl.tokenizer.dalle import DalleTokenizer

    return DalleTokenizer(None, cfg.model.img_size // ARCH_SPECS[cfg.model.arch].patch_size)


def step_flops(cfg, batch: int, keys: int) -> float:
    """Model FLOPs of one step of the method (the formulas in the module docstring)."""
    spec = ARCH_SPECS[cfg.model.arch]
    T, D, L, P = (cfg.model.img_size // spec.patch_size) ** 2 + 1, spec.embed_dim, spec.depth, spec.patch_size
    encoder = batch * (L * (24 * T * D * D + 4 * T * T * D) + 2 * (T - 1) * 3 * P * P * D)
    if cfg.method.name == "beit":  # one view; the LM head on the masked tokens; the frozen tokenizer not counted
        return 3 * encoder + 3 * 2 * batch * cfg.beit.mask_patches * D * 8192
    section = cfg.sit if cfg.method.name == "sit" else cfg.moco
    H, d = section.mlp_dim, section.dim
    loss = 2 * 3 * 2 * batch * keys * d
    if cfg.method.name == "sit":
        head = 2 * batch * (D * H + H * H + H * d)
        pixels = 2 * batch * (T - 1) * (3 * D * D + 3 * D * P * P)
        return 2 * (3 * (encoder + head + pixels) + encoder + head) + loss
    projector = 2 * batch * (D * H + H * H + H * d)
    predictor = 2 * batch * (d * H + H * d)
    per_view = 3 * (encoder + projector + predictor) + encoder + projector
    return 2 * per_view + loss


def measured_peak_tflops(device: torch.device) -> float:
    """Best TFLOP/s of a large matrix product on this device: bf16 8192^3 on CUDA, fp32 3072^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (3072, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 4):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """One training step of the method, optionally split into timed phases (Method.step_losses, opened up)."""

    def __init__(self, setup: Setup, device: torch.device):
        overrides = [f"model.arch={setup.arch}", f"model.img_size={setup.img_size}", f"data.batch_size={setup.batch}"]
        overrides.append(f"method.name={setup.method}")
        if setup.method == "sit":
            overrides += ["model.pos_embed=learned", "model.init=trunc_normal", "model.frozen_patch_embed=false"]
        if setup.method == "beit":
            grid = setup.img_size // ARCH_SPECS[setup.arch].patch_size
            overrides += [f"beit.mask_patches={max(1, round(0.4 * grid * grid))}", "beit.mask_min_patches=1"]
        if setup.arch == "vit_demo" and setup.method != "beit":
            section = "sit" if setup.method == "sit" else "moco"
            overrides += [f"{section}.dim=128", f"{section}.mlp_dim=1024"]
        if setup.data is not None:
            overrides += [f"data.root={setup.data}", f"data.backend={setup.backend}", "data.num_workers=4"]
        if setup.uint8_views and not setup.baseline:
            overrides.append("data.uint8_views=true")
        if setup.compile and not setup.baseline:
            overrides.append("model.compile=true")
        self.cfg = load(BEIT_CONFIG if setup.method == "beit" else None, overrides)
        self.setup, self.device = setup, device
        ops = REFERENCE_OPS if setup.baseline else select_ops(setup.kernels, device)
        self.fused = ops.fused
        torch.manual_seed(0)
        with mock.patch("fastvit_ssl.methods.beit.build_tokenizer", random_dalle_tokenizer):
            self.model = build_method(self.cfg, ops).to(device)
        if setup.baseline:  # torch's default AdamW, as the official scripts build it
            groups = [{k: v for k, v in g.items() if k != "decay"} for g in self.model.param_groups()]
            self.optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1)
        else:
            self.optimizer = build_optimizer(self.cfg.optim, self.model.param_groups(), ops)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.precision)
        autocast = dtype and device.type != "meta"  # on meta, step_cost.py emulates autocast
        self.autocast = torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if setup.precision == "fp16" else None
        S, uint8 = setup.img_size, self.cfg.data.uint8_views
        self.views = [
            torch.randint(0, 256, (setup.batch, S, S, 3), dtype=torch.uint8, device=device)
            if uint8
            else torch.randn(setup.batch, 3, S, S, device=device)
            for _ in range(2)
        ]
        self.batches = None  # real batches of the configured pipeline (torch or DALI) over the folder, if given
        if setup.data is not None:
            self.batches = endless_batches(build_train_data(self.cfg, setup.data, device)[0])
        self.attention = ATTENTION[setup.attention]
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4

    def ema(self) -> None:
        if self.setup.baseline:
            pairs = self.model.ema_pairs()
            with torch.no_grad():
                for b, m in pairs:
                    m.data = m.data * 0.99 + b.data * (1.0 - 0.99)
        else:
            self.model.update_ema(0.99)

    def step(self, mark=lambda phase: None) -> None:
        """Inputs, forward, EMA, targets, loss, backward, optimizer; `mark` ends each phase."""
        if self.batches is None:
            views = [v.clone() for v in self.views]  # stands for the host-to-device copy of real batches
        else:
            views = [v.to(self.device, non_blocking=True) for v in next(self.batches).views[:2]]
        mark("data")
        batch = self.model.prepare(views, step=0)
        mark("prepare")
        backend = sdpa_kernel(self.attention) if self.attention is not None else contextlib.nullcontext()
        with self.autocast, backend:
            outputs = self.model.online(*self.model.online_inputs(batch))
            mark("forward")
            self.ema()
            mark("ema")
            targets = self.model.targets(batch)
            mark("targets")
            loss = self.model.losses(outputs, targets, batch)["loss"]
            mark("loss")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            mark("backward")
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            mark("backward")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    def phase_times(self, reps: int) -> dict[str, float]:
        """Median milliseconds of each phase (synchronising at every boundary, so their sum exceeds a step)."""
        samples = {p: [] for p in PHASES}
        clock = [0.0]

        def mark(phase: str) -> None:
            sync(self.device)
            now = time.perf_counter()
            samples[phase].append((now - clock[0]) * 1e3)
            clock[0] = now

        for _ in range(reps):
            sync(self.device)
            clock[0] = time.perf_counter()
            self.step(mark)
        return {p: round(statistics.median(v), 3) for p, v in samples.items()}


def step_seconds(trainer: Trainer) -> float:
    sync(trainer.device)
    start = time.perf_counter()
    trainer.step()
    sync(trainer.device)
    return time.perf_counter() - start


def run(setups: list[Setup], device: torch.device, steps: int, peak: float) -> list[dict]:
    """Time the setups' steps interleaved (A B A B ...), so that drifts of the machine hit them alike."""
    trainers = [Trainer(setup, device) for setup in setups]
    for trainer in trainers:
        for _ in range(2):  # warm-up: kernel compilation, allocator
            trainer.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [[] for _ in trainers]
    for _ in range(steps):
        for t, trainer in zip(times, trainers):
            t.append(step_seconds(trainer))
    return [row(trainer, t, peak, max(2, steps // 2)) for trainer, t in zip(trainers, times)]


def paired_ratios(ours: dict, base: dict) -> list[float]:
    """baseline / ours step time round by round (the two were timed alternately, so each pair shares the machine's
    state at that moment)."""
    a, b = (list(map(float, r["step_ms_samples"].split())) for r in (ours, base))
    return sorted(y / x for x, y in zip(a, b))


def row(trainer: Trainer, times: list[float], peak: float, phase_reps: int) -> dict:
    setup, median = trainer.setup, statistics.median(times)
    flops = step_flops(trainer.cfg, setup.batch, keys=setup.batch)
    cuda = trainer.device.type == "cuda"
    return {
        "mode": "baseline" if setup.baseline else "ours",
        "method": setup.method,
        "arch": setup.arch,
        "batch": setup.batch,
        "img_size": setup.img_size,
        "precision": setup.precision,
        "kernels": "fused" if trainer.fused else "reference",
        "attention": setup.attention,
        "data": str(setup.data) if setup.data else "synthetic",
        "views": "uint8" if trainer.cfg.data.uint8_views else "float",
        "compiled": trainer.cfg.model.compile,
        "images_per_second": round(setup.batch / median, 1),
        "step_ms": round(median * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "step_ms_samples": " ".join(f"{t * 1e3:.3f}" for t in times),
        "TFLOP/s": round(flops / median / 1e12, 3),
        "MFU": round(flops / median / 1e12 / peak, 4),
        "peak_TFLOP/s": round(peak, 2),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "",
        **{f"{p} ms": t for p, t in trainer.phase_times(phase_reps).items()},
    }


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    methods = ["mocov3", "sit", "beit", "all"]
    parser.add_argument("--method", default="mocov3", choices=methods, help="all: with --suite")
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCH_SPECS), help="the ViT")
    parser.add_argument("--batch", type=int, default=32, help="images per step (one device)")
    parser.add_argument("--img-size", type=int, default=224, help="pixels")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default: bf16 (ours) / fp16 AMP (baseline) on CUDA, fp32 on CPU",
    )
    parser.add_argument("--kernels", choices=["fused", "reference"], default="fused", help="ours (CUDA only)")
    parser.add_argument("--attention", choices=sorted(ATTENTION), default="default", help="SDPA's backend")
    parser.add_argument("--baseline", action="store_true", help="the official MoCo v3 code's way")
    parser.add_argument("--data", type=Path, help="an ImageFolder root with train/ (default: synthetic tensors)")
    parser.add_argument("--backend", choices=["auto", "torch", "dali"], default="auto", help="with --data")
    parser.add_argument("--uint8-views", action="store_true", help="ours takes uint8 NHWC views (data.uint8_views)")
    parser.add_argument("--compile", action="store_true", help="ours with model.compile=true (compiled blocks)")
    parser.add_argument("--compare", action="store_true", help="ours and the baseline, with their ratio")
    parser.add_argument("--suite", action="store_true", help="SUITE's cases of --method, both modes")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (ours and the baseline alternate)")
    parser.add_argument("--out", type=Path, help="CSV (and a .json beside it)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measured_peak_tflops(device)
    cases = [(args.method, args.arch, args.batch)]
    if args.suite:
        cases = [(m, a, b) for m, a, b in SUITE if m == args.method or args.method == "all"]
    modes = [False, True] if args.compare or args.suite else [args.baseline]
    rows = []
    for method, arch, batch in cases:
        setups = []
        for baseline in modes:
            precision = args.precision or ("fp32" if device.type != "cuda" else "fp16" if baseline else "bf16")
            setups.append(
                Setup(
                    arch,
                    batch,
                    args.img_size,
                    precision,
                    args.kernels,
                    args.attention,
                    baseline,
                    args.data,
                    args.backend,
                    args.uint8_views,
                    method,
                    args.compile,
                )
            )
        rows += run(setups, device, args.steps, peak)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {
        "device": runinfo.device_name(device),
        "commit": runinfo.git_commit(),
        "date": datetime.date.today().isoformat(),
        **runinfo.versions(),
    }
    rows = [{**r, **meta} for r in rows]
    print_summary(rows)
    if args.out:
        write_rows(rows, args.out)
    return rows


def print_summary(rows: list[dict]) -> None:
    """Two narrow tables (the CSV has every column) and each comparison's ratio with its spread."""
    print(
        f"{rows[0]['device']} | torch {rows[0]['torch']} | commit {rows[0]['commit'][:12]} | "
        f"peak {rows[0]['peak_TFLOP/s']} TFLOP/s (measured matmul)"
    )
    shown = [
        {
            **r,
            "step ms (min-max)": f"{r['step_ms']} ({r['step_ms_min']}-{r['step_ms_max']})",
            "setup": f"{r['precision']} {r['kernels']}{' compiled' if r['compiled'] else ''} {r['views']}",
        }
        for r in rows
    ]  # display columns, not written to the CSV
    print_table(shown, ["mode", "method", "arch", "batch", "setup", "images_per_second", "step ms (min-max)", "MFU"])
    print("\nper phase, median ms (synchronised at each boundary):")
    print_table(rows, ["mode", "arch", *[f"{p} ms" for p in PHASES]])
    for ours, base in zip(rows[::2], rows[1::2]):
        if ours["mode"] == "ours" and base["mode"] == "baseline" and ours["arch"] == base["arch"]:
            ratios = paired_ratios(ours, base)
            ratio, low, high = base["step_ms"] / ours["step_ms"], ratios[0], ratios[-1]
            verdict = "within noise" if low <= 1.0 <= high else ("faster" if low > 1.0 else "slower")
            print(
                f"{ours['arch']} batch {ours['batch']}: ours / baseline = {ratio:.2f}x "
                f"(per round {low:.2f}-{high:.2f} over {len(ratios)} rounds: {verdict})"
            )
            if verdict == "within noise" or len(ratios) < 5:
                print("  the rounds disagree or are few: more --steps, or a quieter machine, before reading this")


if __name__ == "__main__":
    main()
