"""Peak extra memory of BEiT's LM head + loss, forward and backward: the plain head (the N x V logits) against the
fused kernel (kernels/linear_ce.py), each in a fresh process so that its peak is its own.

    python benchmarks/lm_head_memory.py                          # N=4096 tokens, D=768, V=8192, fp32, on CPU
    python benchmarks/lm_head_memory.py --rows 19200 --dtype bf16 --out benchmarks/results/lm-head-memory.csv

On CUDA it reads torch.cuda.max_memory_allocated; on a CPU the growth of the process's peak resident memory
(ru_maxrss), with the fused kernel run by the Triton interpreter (its speed means nothing; its memory does: the
same chunked algorithm, the same tensors).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import resource
from pathlib import Path

import torch

from rows import print_table, write_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_mib(impl: str, rows: int, dim: int, vocab: int, dtype: str, queue) -> None:
    """Runs in a fresh process: one forward + backward of `impl`, its peak memory above the inputs' in MiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from fastvit_ssl.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_ref

    fn = linear_cross_entropy if impl == "fused" else linear_cross_entropy_ref
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, dim, generator=g, device=device, dtype=DTYPES[dtype]).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g, device=device, dtype=DTYPES[dtype]) * dim**-0.5).requires_grad_()
    b = torch.zeros(vocab, device=device, dtype=DTYPES[dtype], requires_grad=True)
    t = torch.randint(0, vocab, (rows,), generator=g, device=device)
    fn(x[:4], w, b, t[:4]).backward()  # first-call costs (lazy imports, the interpreter's set-up) paid before
    x.grad = w.grad = b.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    loss = fn(x, w, b, t)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - start) / 2**20)
    else:
        queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="masked tokens (BEiT-B per GPU: 256 x 75 = 19,200)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--out", type=Path, help="CSV (and a .json beside it)")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    for impl in ("reference", "fused"):
        queue = context.Queue()
        process = context.Process(target=peak_mib, args=(impl, args.rows, args.dim, args.vocab, args.dtype, queue))
        process.start()
        peak = queue.get()
        process.join()
        rows.append(
            {
                "impl": impl,
                "shape": f"N={args.rows} D={args.dim} V={args.vocab}",
                "dtype": args.dtype,
                "peak_extra_MiB": round(peak, 1),
                "device": "cuda" if torch.cuda.is_available() else "cpu (ru_maxrss)",
                "date": datetime.date.today().isoformat(),
            }
        )
    print_table(rows, ["impl", "shape", "dtype", "peak_extra_MiB", "device"])
    logits = args.rows * args.vocab * 4 / 2**20
    print(f"(one fp32 N x V matrix is {logits:.0f} MiB)")
    if args.out:
        write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
