"""Peak extra memory of BEiT's LM head + loss, forward and backward: the plain head (the N x V logits) against the
fused kernel (kernels/linear_ce.py), each in a fresh process so that its peak is its own.

    python benchmarks/lm_head_memory.py                          # N=4096 tokens, D=768, V=8192, fp32, on CPU
    python benchmarks/lm_head_memory.py --rows 19200 --dtype bf16 --out benchmarks/results/lm-head-memory.csv

On CUDA it reads torch.cuda.max_memory_allocated. On a CPU it counts the bytes of the tensors alive at once (every
tensor an op returns, through a dispatch mode, until its last reference goes), with the fused kernel run by the
Triton interpreter: its speed means nothing, its tensors are the same chunked algorithm's. Counted, not read from
the process's resident memory, so the number is the same on any machine, busy or not.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rows import print_table, write_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that tensors made inside the mode hold at once (views share their storage)."""

    def __init__(self):
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.tensors:
                    self.tensors[key], self.sizes[key] = 0, storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.tensors[key] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.tensors[key] -= 1
        if not self.tensors[key]:
            del self.tensors[key]
            self.live -= self.sizes.pop(key)


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
    if device.type == "cpu":
        with LiveTensorBytes() as counted:
            fn(x, w, b, t).backward()
        queue.put(counted.peak / 2**20)
        return
    fn(x[:4], w, b, t[:4]).backward()  # first-call costs (compilation, the allocator's pools) paid before
    x.grad = w.grad = b.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x, w, b, t).backward()
    torch.cuda.synchronize()
    queue.put((torch.cuda.max_memory_allocated() - start) / 2**20)


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
                "device": "cuda" if torch.cuda.is_available() else "cpu (live tensors counted)",
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
