r"""End-to-end training throughput of a method (MoCo v3; SiT or BEiT with --method): images/s, step time, model
TFLOP/s and MFU, peak memory, warm-up time and a per-phase breakdown, for our step and for the official code's.

    python benchmarks/throughput.py --arch vit_small --batch 32                    # our step
    python benchmarks/throughput.py --compare --arch vit_demo --img-size 28        # ours, both baselines, ratios
    python benchmarks/throughput.py --compare --arch vit_base --batch 128 --attention auto flash cudnn \
        --compile default reduce-overhead                        # GPU: eager per kernel, compiled per mode
    python benchmarks/throughput.py --suite --method all --out benchmarks/results/throughput-h100.csv   # GPU

Ours is the engine's own training step (engine/local.py, or engine/deepspeed_engine.py with --engine deepspeed),
built as train.py builds it: the same call, with every per-step duty it has (buffer copy, per-layer gradient norms,
clipping, the finiteness check). Phases are marked from inside that step (methods/base.py's PHASES).
The baseline is the official code's step (baseline.py): fp16 with a GradScaler, the EMA as a loop over parameters,
one pass per view, materialised logits, torch's default AdamW; in two forms, its attention as the official MoCo v3
pins it (timm 0.4.9's plain ops, "explicit") and as torch's SDPA ("auto").

FLOPs of one step are counted analytically by the method (Method.step_flops: multiply-adds x 2 of the encoder,
B (L (24 T D^2 + 4 T^2 D) + 2 T C P^2 D) per pass, its heads and its loss). MFU = model FLOP/s / peak FLOP/s, the
peak taken from a large matrix product measured on the same device (bf16 on CUDA, fp32 on CPU), not a datasheet.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from baseline import MODERN, PINNED, OfficialStep, timed_hyperparameters

from fastvit_ssl import distributed, runinfo
from fastvit_ssl.config import DEFAULT_METHOD, Config, load
from fastvit_ssl.data.build import build_train_data, endless_batches
from fastvit_ssl.engine.build import build_engine
from fastvit_ssl.kernels.dispatch import select_ops
from fastvit_ssl.methods.base import METHODS, PHASES, method_class, no_mark
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models.attention import AttentionUnavailable, check_available
from fastvit_ssl.specs import ARCH_SPECS
from rows import print_table, write_rows

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # each method's GPU recipe: Method.recipe


@dataclass(frozen=True)
class Setup:
    arch: str
    batch: int
    img_size: int
    precision: str  # fp32 | bf16 | fp16
    kernels: str = "fused"  # ours: fused | reference (the baseline: reference)
    attention: str = "auto"  # model.attention (the baseline: explicit = pinned, auto = modern)
    baseline: bool = False
    method: str = DEFAULT_METHOD
    compile: str = ""  # ours: "" (eager) or torch.compile's mode for model.compile
    engine: str = "local"  # ours: local | deepspeed
    uint8_views: bool = False  # ours only: [B, S, S, 3] uint8 views, normalised inside the patch embedding
    data: Path | None = None  # an ImageFolder root (with train/); None: synthetic tensors on the device
    backend: str = "auto"

    @property
    def form(self) -> str:
        if not self.baseline:
            return f"ours ({self.attention}, {f'compiled {self.compile}' if self.compile else 'eager'})"
        return "baseline (timm 0.4.9 attention)" if self.attention == PINNED else "baseline (SDPA)"


def config(setup: Setup) -> Config:
    """The method's GPU recipe (configs/) at this setup's size, precision and kernels."""
    method = method_class(setup.method)
    overrides = [
        f"model.arch={setup.arch}",
        f"model.img_size={setup.img_size}",
        f"data.batch_size={setup.batch}",
        f"run.precision={setup.precision}",
        f"run.kernels={'reference' if setup.baseline else setup.kernels}",
        f"model.attention={setup.attention}",
        f"engine.name={setup.engine}",
        *method.benchmark_overrides(setup.arch, setup.img_size),
    ]
    if setup.data is not None:
        overrides += [f"data.root={setup.data}", f"data.backend={setup.backend}", "data.num_workers=4"]
    if setup.uint8_views and not setup.baseline:
        overrides.append("data.uint8_views=true")
    compiled = bool(setup.compile) and not setup.baseline  # the setup decides, not the recipe's default
    overrides.append(f"model.compile={str(compiled).lower()}")
    if compiled:
        overrides.append(f"model.compile_mode={setup.compile}")
    return load(CONFIGS / method.recipe, overrides)


class Ours:
    """The engine's training step, built as train.py builds it (seed, kernels, method, engine)."""

    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.run.seed)
        ops = select_ops(cfg.run.kernels, device)
        self.model = build_method(cfg, ops).to(device)
        self.engine = build_engine(cfg, self.model, device, ops)
        self.fused = ops.fused
        self.hparams = timed_hyperparameters(cfg)

    @property
    def mark(self):
        return self.engine.mark

    @mark.setter
    def mark(self, hook) -> None:
        self.engine.mark = hook

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def step(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.engine.step(views, step, self.hparams)[0]["loss"]


class Bench:
    """One setup's step on its inputs: synthetic views on the device (copied each step, as a host-to-device copy of
    real batches would be) or the configured pipeline's batches."""

    def __init__(self, setup: Setup, device: torch.device):
        self.setup, self.device, self.cfg = setup, device, config(setup)
        self.impl = OfficialStep(self.cfg, device) if setup.baseline else Ours(self.cfg, device)
        self.views = self.synthetic_views(setup.batch)
        self.batches = None
        if setup.data is not None:
            views = method_class(setup.method).views(self.cfg)
            self.batches = endless_batches(build_train_data(self.cfg, setup.data, device, views)[0])

    def synthetic_views(self, batch: int) -> list[torch.Tensor]:
        """The method's views (their number and sizes), random, on the device."""
        return [
            torch.randint(0, 256, (batch, v.size, v.size, 3), dtype=torch.uint8, device=self.device)
            if self.cfg.data.uint8_views
            else torch.randn(batch, 3, v.size, v.size, device=self.device)
            for v in method_class(self.setup.method).views(self.cfg)
        ]

    def step(self) -> None:
        views = [v.clone() for v in self.views] if self.batches is None else next(self.batches).views
        self.impl.step(views, 0)

    def phase_times(self, reps: int) -> dict[str, float]:
        """Median milliseconds of each phase (synchronising at every boundary, so their sum exceeds a step)."""
        samples = {p: [] for p in PHASES}
        clock = [0.0]

        def mark(phase: str) -> None:
            sync(self.device)
            now = time.perf_counter()
            samples[phase].append((now - clock[0]) * 1e3)
            clock[0] = now

        self.impl.mark = mark
        try:
            for _ in range(reps):
                sync(self.device)
                clock[0] = time.perf_counter()
                self.step()
        finally:
            self.impl.mark = no_mark
        return {p: round(statistics.median(v), 3) if v else "" for p, v in samples.items()}


def step_flops(cfg: Config, batch: int, keys: int) -> float:
    """Model FLOPs of one step of the method (Method.step_flops)."""
    return method_class(cfg.method.name).step_flops(cfg, batch, keys)


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


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def prepare(setups: list[Setup], device: torch.device) -> list[tuple[Bench, float, float]]:
    """(bench, warm-up seconds, peak GiB) per setup. Each is built and warmed up (compilation, allocator) in turn,
    its peak memory measured from a reset, less what the setups built before it hold: its own peak, as alone.
    A setup that fails to build or step is reported and left out: the rest of the matrix is still measured."""
    prepared = []
    for setup in setups:
        before = allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            bench = Bench(setup, device)
            for _ in range(3):  # compilation; CUDA graphs are recorded at the second or third call
                bench.step()
            sync(device)
        except Exception as e:  # noqa: BLE001 (any failure of one variant: compiler, kernel, memory)
            print(f"failed, left out: {setup.form} {setup.method} {setup.arch}: {type(e).__name__}: {e}"[:2000])
            bench = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        warmup = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else float("nan")
        prepared.append((bench, warmup, peak))
    return prepared


def run(setups: list[Setup], device: torch.device, steps: int, peak: float, max_batch: bool) -> list[dict]:
    """Time the setups' steps interleaved (A B A B ...), so that drifts of the machine hit them alike."""
    prepared = prepare(setups, device)
    times = [[] for _ in prepared]
    for _ in range(steps):
        for t, (bench, _, _) in zip(times, prepared):
            sync(device)
            start = time.perf_counter()
            bench.step()
            sync(device)
            t.append(time.perf_counter() - start)
    rows = [row(b, t, peak, max(2, steps // 2), warm, mem) for (b, warm, mem), t in zip(prepared, times)]
    measured = [bench.setup for bench, _, _ in prepared]
    del prepared
    if max_batch:  # eager runs with the first attention kernel: a compiled one would compile at every size
        for r, setup in zip(rows, measured):
            if not setup.compile and (setup.baseline or setup.attention == setups[0].attention):
                r["max_batch"] = largest_batch(setup, device)
    return rows


def largest_batch(setup: Setup, device: torch.device) -> int | str:
    """A per-GPU batch (multiple of 8) that one step of `setup` fits, within ~10% of the largest: the peak memory at
    half and full batch gives the fixed and per-image bytes (activations grow linearly with the batch), the guess
    fills 95% of the GPU, and one step checks it (shrinking by a tenth until one fits). One build, a few steps: a
    search by doubling, a build per trial, did not finish ViT-B's three setups in 50 s on an H200 (2026-12-04)."""
    if device.type != "cuda":
        return ""
    bench = Bench(setup, device)

    def peak(batch: int) -> int | None:
        """Peak bytes of one step at `batch`, None if it does not fit."""
        torch.cuda.reset_peak_memory_stats()
        try:
            bench.views = bench.synthetic_views(batch)
            bench.step()
            sync(device)
            return torch.cuda.max_memory_allocated()
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            bench.views = []
            gc.collect()
            torch.cuda.empty_cache()

    small, large = max(1, setup.batch // 2), max(2, setup.batch)
    low, high = peak(small), peak(large)
    if low is None or high is None:
        return 0 if low is None else small
    per_image = max(1.0, (high - low) / (large - small))
    batch = int((0.95 * torch.cuda.get_device_properties(device).total_memory - high) / per_image) + large
    batch = batch // 8 * 8
    while batch > large and peak(batch) is None:
        batch = int(batch * 0.9) // 8 * 8
    return max(batch, large)


def paired_ratios(ours: dict, base: dict) -> list[float]:
    """baseline / ours step time round by round (the two were timed alternately, so each pair shares the machine's
    state at that moment)."""
    a, b = (list(map(float, r["step_ms_samples"].split())) for r in (ours, base))
    return sorted(y / x for x, y in zip(a, b))


def row(bench: Bench, times: list[float], peak: float, phase_reps: int, warmup: float, memory: float) -> dict:
    setup, cfg, median = bench.setup, bench.cfg, statistics.median(times)
    flops = step_flops(cfg, setup.batch, keys=setup.batch * distributed.world_size())
    return {
        "mode": "baseline" if setup.baseline else "ours",
        "form": setup.form,
        "method": setup.method,
        "arch": setup.arch,
        "batch": setup.batch,
        "img_size": setup.img_size,
        "precision": setup.precision,
        "kernels": "fused" if getattr(bench.impl, "fused", False) else "reference",
        "attention": cfg.model.attention,
        "compiled": cfg.model.compile_mode if cfg.model.compile else "eager",
        "engine": "official loop" if setup.baseline else cfg.engine.name,
        "data": str(setup.data) if setup.data else "synthetic",
        "views": "uint8" if cfg.data.uint8_views else "float",
        "images_per_second": round(setup.batch / median, 1),
        "step_ms": round(median * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "step_ms_samples": " ".join(f"{t * 1e3:.3f}" for t in times),
        "warmup_s": round(warmup, 1),
        "TFLOP/s": round(flops / median / 1e12, 3),
        "MFU": round(flops / median / 1e12 / peak, 4),
        "peak_TFLOP/s": round(peak, 2),
        "peak_memory_GiB": "" if memory != memory else round(memory, 2),
        "max_batch": "",
        **{f"{p} ms": t for p, t in bench.phase_times(phase_reps).items()},
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--method", default=DEFAULT_METHOD, choices=[*METHODS, "all"], help="all: with --suite (default: %(default)s)"
    )
    parser.add_argument(
        "--arch", default="vit_small", choices=sorted(ARCH_SPECS), help="the ViT (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=32, help="images per step (one device) (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="pixels (default: %(default)s)")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="(default: on CUDA bf16 for ours, fp16 for the baseline; fp32 on a CPU)",
    )
    parser.add_argument(
        "--kernels", choices=["fused", "reference"], help="ours' (default: fused on CUDA, reference on a CPU)"
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        help="ours' model.attention, one eager run each (unavailable: skipped) (default: auto)",
    )
    parser.add_argument(
        "--compile", nargs="*", help="ours compiled with the first --attention, one run per mode (no mode: default)"
    )
    parser.add_argument(
        "--engine", choices=["local", "deepspeed"], default="local", help="ours' engine (default: %(default)s)"
    )
    parser.add_argument("--baseline", action="store_true", help="the official code's step only (both forms)")
    parser.add_argument("--compare", action="store_true", help="ours and both forms of the baseline, with ratios")
    parser.add_argument(
        "--forms",
        nargs="+",
        default=[PINNED, MODERN],
        help=f"the baseline's attention forms (default: {PINNED} {MODERN})",
    )
    parser.add_argument("--data", type=Path, help="an ImageFolder root with train/ (default: synthetic tensors)")
    parser.add_argument(
        "--backend", choices=["auto", "torch", "dali"], default="auto", help="with --data (default: %(default)s)"
    )
    parser.add_argument("--uint8-views", action="store_true", help="ours takes uint8 NHWC views (data.uint8_views)")
    parser.add_argument(
        "--suite", action="store_true", help="the method's suite cases (Method.suite), ours and the baseline"
    )
    parser.add_argument("--max-batch", action="store_true", help="also search the largest batch each fits (CUDA)")
    parser.add_argument(
        "--steps", type=int, default=6, help="timed rounds (the setups alternate) (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="CSV (and a .json beside it)")
    return parser.parse_args(argv)


def setups_for(args, method: str, arch: str, batch: int, device: torch.device) -> list[Setup]:
    """Ours eager with each available --attention, compiled in each --compile mode, then the baseline's forms."""
    cuda = device.type == "cuda"
    ours = Setup(
        arch,
        batch,
        args.img_size,
        args.precision or ("bf16" if cuda else "fp32"),
        args.kernels or ("fused" if cuda else "reference"),
        args.attention[0],
        method=method,
        engine=args.engine,
        uint8_views=args.uint8_views,
        data=args.data,
        backend=args.backend,
    )
    variants = [replace(ours, attention=a) for a in args.attention if available(replace(ours, attention=a), device)]
    if args.compile is not None:
        variants += [replace(ours, compile=mode) for mode in args.compile or ["default"]]
    base = replace(ours, baseline=True, precision=args.precision or ("fp16" if cuda else "fp32"))
    baselines = [replace(base, attention=form) for form in args.forms]
    if args.baseline:
        return baselines
    return [*variants, *baselines] if args.compare or args.suite else variants


def available(setup: Setup, device: torch.device) -> bool:
    """Whether ours can run this setup's attention kernel here; says why not."""
    cfg = config(setup)
    try:
        check_available(setup.attention, device, cfg.model.rel_pos_bias != "none", setup.precision)
        return True
    except AttentionUnavailable as e:
        print(f"skipped: {e}")
        return False


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.init_from_env(device)
    peak = measured_peak_tflops(device)
    cases = [(args.method, args.arch, args.batch)]
    if args.suite:
        chosen = METHODS if args.method == "all" else [args.method]
        cases = [(m, arch, batch) for m in chosen for arch, batch, _ in METHODS[m].suite]
    rows = []
    for method, arch, batch in cases:
        rows += run(setups_for(args, method, arch, batch, device), device, args.steps, peak, args.max_batch)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {
        "device": runinfo.device_name(device),
        "commit": runinfo.git_commit(),
        "date": datetime.date.today().isoformat(),
        **runinfo.versions(),
    }
    if not rows:
        raise SystemExit("no setup could be measured: see the failures above")
    rows = [{**r, **meta} for r in rows]
    if distributed.is_main():
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
            "setup": f"{r['precision']} {r['kernels']} {r['attention']} {r['compiled']} {r['views']}",
        }
        for r in rows
    ]  # display columns, not written to the CSV
    columns = ["form", "method", "arch", "batch", "setup", "images_per_second", "step ms (min-max)", "MFU"]
    print_table(shown, [*columns, "warmup_s", "peak_memory_GiB", "max_batch"])
    print("\nper phase, median ms (synchronised at each boundary):")
    print_table(rows, ["form", "arch", *[f"{p} ms" for p in PHASES]])
    for ours in (r for r in rows if r["mode"] == "ours"):
        for base in (
            r for r in rows if r["mode"] == "baseline" and (r["method"], r["arch"]) == (ours["method"], ours["arch"])
        ):
            ratios = paired_ratios(ours, base)
            ratio, low, high = base["step_ms"] / ours["step_ms"], ratios[0], ratios[-1]
            verdict = "within noise" if low <= 1.0 <= high else ("faster" if low > 1.0 else "slower")
            print(
                f"{ours['method']} {ours['arch']} batch {ours['batch']}: ours / {base['form']} = {ratio:.2f}x "
                f"(per round {low:.2f}-{high:.2f} over {len(ratios)} rounds: {verdict})"
            )
            if verdict == "within noise" or len(ratios) < 5:
                print("  the rounds disagree or are few: more --steps, or a quieter machine, before reading this")


if __name__ == "__main__":
    main()
