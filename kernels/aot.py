"""Ahead-of-time compile check: every Triton kernel of the project, compiled without a GPU for A100 (sm_80) and
H100 (sm_90a), at exactly the launches its launcher makes there.

How: the public launchers run on `meta` tensors of realistic sizes (`shapes.py`) inside
`target.planning_for(A100 | H100)`, so they pick their configuration as on that GPU; `JITFunction.run` is replaced
by a recorder, so nothing is launched. Each distinct recorded launch is bound and specialised by Triton's own
binder for the target (argument types, 16-divisibility of pointers and integers), compiled by Triton's compiler
down to a cubin with its bundled ptxas, and ptxas's verbose log gives registers, spill bytes and stack frame.

A launch fails the check on a compile error, shared memory above the architecture's per-block limit, any
register spill, or ptxas serialising the H100's wgmma instructions for want of registers (a silent slowdown).
A kernel (a `@triton.jit` function no other kernel calls) that no shape launches fails it too.

    python -m fastvit_ssl.kernels.aot [--arch 80 90] [--jobs 2] [--json rows.json]

Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions). What it cannot say:
speed, and numerics on real hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import time
from dataclasses import dataclass

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastvit_ssl.kernels.target import A100, H100, Target, planning_for

TARGETS = {80: A100, 90: H100}
SMEM_PER_BLOCK = {80: 166_912, 90: 232_448}  # bytes a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SMEM_PER_SM = {80: 167_936, 90: 233_472}  # of which the CUDA runtime reserves 1 KiB per resident block
NOT_KERNEL_MODULES = {"aot", "dispatch", "shapes", "target"}


@dataclass(frozen=True)
class Job:
    """One distinct compilation: a kernel with its specialised signature and options for one architecture."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    case: str  # the first problem that launches it

    def config(self) -> str:
        """Constexpr values and launch options, e.g. 'BLOCK_N=64 BLOCK_D=256 warps=8 stages=3'."""
        names = list(self.signature)
        values = " ".join(f"{names[path[0]]}={value}" for path, value in self.constexprs.items())
        return f"{values} warps={self.options['num_warps']} stages={self.options['num_stages']}".strip()

    def key(self) -> str:
        return repr((self.module, self.kernel, self.arch, self.signature, self.constexprs, self.attrs, self.options))


@contextlib.contextmanager
def recording():
    """Launches are recorded as (kernel, args, kwargs) instead of compiled and run."""
    calls, run = [], JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: calls.append((self, args, kwargs))
    try:
        yield calls
    finally:
        JITFunction.run = run


def plan(cases, target: Target) -> list[Job]:
    """The distinct compilations the launchers ask for on `target`, for every (label, launch) in `cases`."""
    backend = make_backend(GPUTarget("cuda", target.arch, 32))
    jobs = {}
    for label, launch in cases:
        with planning_for(target), recording() as calls:
            launch()
        for kernel, args, kwargs in calls:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            job = Job(
                kernel.module, kernel.__name__, target.arch, signature, constexprs, attrs, options.__dict__, label
            )
            jobs.setdefault(job.key(), job)
    return list(jobs.values())


def _ptxas_numbers(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"no register report in the ptxas log:\n{log}")
    return dict(
        registers=int(regs.group(1)),
        stack_bytes=int(frame.group(1)),
        spill_bytes=int(frame.group(2)) + int(frame.group(3)),
        wgmma_serialized="wgmma.mma_async instructions are serialized" in log,
    )


def blocks_per_sm(arch: int, warps: int, registers: int, shared: int) -> int:
    """Resident blocks per SM these resources allow (64 warps, 65,536 registers in 256-per-warp units, smem)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_smem = SMEM_PER_SM[arch] // (shared + 1024)
    return min(32, 64 // warps, 65_536 // (regs_per_warp * warps), by_smem)


def compile_job(job: Job) -> dict:
    """Compile one job; its resource row with `problem` (empty when it passes)."""
    row = dict(kernel=job.kernel, case=job.case, arch=f"sm_{job.arch}{'a' if job.arch >= 90 else ''}")
    row.update(config=job.config(), registers="", shared_bytes="", spill_bytes="", stack_bytes="", blocks_per_sm="")
    row["wgmma_serialized"] = ""
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    start, log = time.perf_counter(), io.StringIO()
    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's verbose log; the cache is fresh, so it always runs
        with contextlib.redirect_stdout(log):
            compiled = triton_compile(
                ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                target=GPUTarget("cuda", job.arch, 32),
                options=job.options,
            )
        numbers = _ptxas_numbers(log.getvalue())
    except Exception as e:  # a compile error is a result here, not a crash of the check
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # source excerpt, then the reason
        where = lines[0] if lines and lines[0].startswith("at ") else ""
        reason = f"{where} {lines[-1] if lines else type(e).__name__}".strip()[:300]
        return dict(row, problem=f"compile error {reason}", seconds=round(time.perf_counter() - start, 1))
    shared = compiled.metadata.shared
    row.update(shared_bytes=shared, registers=numbers["registers"], spill_bytes=numbers["spill_bytes"])
    row.update(stack_bytes=numbers["stack_bytes"], wgmma_serialized=numbers["wgmma_serialized"])
    row["blocks_per_sm"] = blocks_per_sm(job.arch, job.options["num_warps"], numbers["registers"], shared)
    problems = []
    if shared > SMEM_PER_BLOCK[job.arch]:
        problems.append(f"shared memory {shared} B > {SMEM_PER_BLOCK[job.arch]} B per block")
    if numbers["spill_bytes"]:
        problems.append(f"{numbers['spill_bytes']} B of register spills")
    if numbers["wgmma_serialized"]:
        problems.append("ptxas serialises its wgmma instructions for want of registers")
    return dict(row, problem="; ".join(problems), seconds=round(time.perf_counter() - start, 1))


def jit_functions(modules) -> dict[str, JITFunction]:
    """Every @triton.jit function defined (not imported) in `modules`, by qualified name."""
    return {
        f"{m.__name__}.{name}": obj
        for m in modules
        for name, obj in vars(m).items()
        if isinstance(obj, JITFunction) and obj.module == m.__name__
    }


def kernels(modules) -> set[str]:
    """Qualified names of the launchable kernels: jit functions that no other jit function calls."""
    functions = jit_functions(modules)
    called = {
        qual
        for qual, fn in functions.items()
        for other in functions.values()
        if other is not fn and re.search(rf"\b{re.escape(fn.__name__)}\(", other.src)
    }
    return set(functions) - called


def project_modules():
    import fastvit_ssl.kernels as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in NOT_KERNEL_MODULES]
    return [importlib.import_module(f"{package.__name__}.{name}") for name in sorted(names)]


def check(cases, modules, archs=(80, 90), jobs: int = 2) -> tuple[list[dict], list[str]]:
    """(resource rows, problems) for every launch of `cases` on each architecture in `archs`."""
    planned = [job for arch in archs for job in plan(cases, TARGETS[arch])]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the workers: every compile runs ptxas afresh
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(compile_job, planned, chunksize=1)
    problems = [
        f"{r['kernel']} [{r['case']}, {r['arch']}, {r['config']}]: {r['problem']}" for r in rows if r["problem"]
    ]
    covered = {f"{job.module}.{job.kernel}" for job in planned}
    problems += [
        f"{name}: no shape launches it, so it is never compiled" for name in sorted(kernels(modules) - covered)
    ]
    return rows, problems


def main(argv=None, cases=None, modules=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations (default: all cores)")
    parser.add_argument("--json", help="write the resource rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("error: unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    if cases is None:
        from fastvit_ssl.kernels.shapes import CASES as cases

    start = time.perf_counter()
    rows, problems = check(cases, modules if modules is not None else project_modules(), args.arch, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    seconds = time.perf_counter() - start
    print(f"{len(rows)} compilations for {', '.join(f'sm_{a}' for a in args.arch)} in {seconds:.0f} s")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
