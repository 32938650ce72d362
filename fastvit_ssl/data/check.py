"""Find unreadable images before they stop a run.

    python -m fastvit_ssl.data.check DIR [--workers 8]

decodes every image under DIR with Pillow (in parallel), lists the unreadable ones with the reason and exits with
status 1 if there are any. `quick_check` is the cheap structural test the DALI pipeline runs on its file list at
start-up (DALI cannot replace a sample it fails to decode): empty files, unknown signatures, and JPEG/PNG files cut
short (no end marker) are left out of the run and counted.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from fastvit_ssl.data.folder import IMAGE_EXTENSIONS, load_rgb
from fastvit_ssl.progress import Progress

SIGNATURES = {  # leading bytes of the formats DALI's decoders and Pillow both read
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
}


def structural_problem(path: str) -> str | None:
    """Why the file cannot be a complete image, or None. Reads only its first and last bytes."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 16))
            tail = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror}"
    kind = next((k for sig, k in SIGNATURES.items() if head.startswith(sig)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        return "not an image (unknown signature)"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def quick_check(paths: list[str], threads: int = 32) -> dict[int, str]:
    """{index: reason} of the paths that fail the structural test (I/O-bound: a thread pool)."""
    progress = Progress("structural check", len(paths), "files")
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(progress.track(pool.map(structural_problem, paths, chunksize=256)))
    return {i: r for i, r in enumerate(reasons) if r is not None}


def decode_problem(path: str) -> str | None:
    try:
        load_rgb(path)
    except Exception as e:  # report whatever Pillow raises, that is the point of the tool
        return f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List images that cannot be decoded (exit status 1 if any).")
    parser.add_argument("root", type=Path, help="a folder; every image file below it is checked")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(str(p) for p in args.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) under {args.root}", file=sys.stderr)
        return 1
    progress = Progress("decoding", len(paths))
    with ProcessPoolExecutor(args.workers) as pool:
        reasons = list(progress.track(pool.map(decode_problem, paths, chunksize=64)))
    problems = [(p, r) for p, r in zip(paths, reasons) if r]
    for path, reason in problems:
        print(f"{path}: {reason}")
    print(f"{len(problems)} unreadable of {len(paths)} images under {args.root}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
