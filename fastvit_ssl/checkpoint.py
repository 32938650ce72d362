"""Checkpoints: atomic writes, newest-first discovery for resume=auto, weights-only loading, clear mismatches."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from fastvit_ssl.config import METHODS, from_dict, model_differences

log = logging.getLogger(__name__)

PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is readable but was written for another model."""


def path_for(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:08d}.pt"


class _HashingWriter:
    """A file wrapper that hashes what torch.save writes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _atomic_write(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(path: Path, state: dict[str, Any]) -> Path:
    """Crash-safe: the checkpoint, then its checksum file, then the `latest` pointer, each written atomically. A
    checkpoint without its checksum file (the process died in between) counts as incomplete and is never used."""
    digest = {}

    def write_state(f):
        writer = _HashingWriter(f)
        torch.save(state, writer)
        digest.update(sha256=writer.sha256.hexdigest(), size=writer.size)

    _atomic_write(path, write_state)
    _atomic_write(checksum_path(path), lambda f: f.write(f"{digest['sha256']}  {digest['size']}\n".encode()))
    _atomic_write(path.parent / "latest", lambda f: f.write(f"{path.name}\n".encode()))
    return path


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` has its checksum file and matches it (size, then SHA-256)."""
    if not checksum_path(path).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no checksum file): the run stopped while writing it")
    expected, size = checksum_path(path).read_text().split()
    if not path.is_file() or path.stat().st_size != int(size):
        raise CheckpointError(f"checkpoint {path} is damaged: size differs from the one recorded when it was written")
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha256.update(block)
    if sha256.hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 differs from the one recorded")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a checksum file) in the run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if checksum_path(p).is_file()]


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    complete = list_checkpoints(run_dir)
    for old in complete[: -keep_last or None]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    keep = set(complete[-keep_last:]) if keep_last else set()
    for p in run_dir.iterdir():
        if (PATTERN.match(p.name) and p not in keep) or p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    """Verify the checksum (where a checksum file exists), then load with weights_only=True: tensors and plain
    containers only, no arbitrary pickled code."""
    if checksum_path(path).exists():
        verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises several types for torn or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
            "it may be damaged or not a fastvit_ssl checkpoint"
        ) from None


# what a run is besides its model and method: its data, batch and augmentation, its seed, and its optimizer and
# schedules (every key of `optim`)
RUN_SETTINGS = (
    ("data", "root"),
    ("data", "batch_size"),
    ("data", "min_scale"),
    ("data", "interpolation"),
    ("run", "seed"),
)


def check_compatible(stored_cfg: dict[str, Any], current_cfg: dict[str, Any], path: Path) -> None:
    """The model (config.model_differences), the method's settings, the data, the batch size, the augmentation,
    the seed, the optimizer and its schedules decide what the run is: all must match to continue from the
    checkpoint (a resume continues exactly). How the model runs (activation checkpointing, compilation, the
    attention kernel, the kernels), logging, checkpointing and evaluation may change. Keys a stored config lacks
    (written before they existed) count as their defaults."""
    run, stored = from_dict(current_cfg), from_dict(stored_cfg)
    diffs = [f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in model_differences(stored, run)]
    section = METHODS[run.method.name].section
    if not diffs:
        keys = [(section, k) for k in dataclasses.asdict(run.method_section)]
        keys += [("optim", k) for k in dataclasses.asdict(run.optim)] + list(RUN_SETTINGS)
        there, here = stored.to_dict(), run.to_dict()
        diffs = [
            f"{s}.{k}: checkpoint {there[s][k]!r}, this run {here[s][k]!r}"
            for s, k in keys
            if _normal(s, k, there[s][k]) != _normal(s, k, here[s][k])
        ]
    if diffs:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} belongs to a run with other settings ({'; '.join(diffs)}). Continue it with its "
            "settings, or start a new run beside it: pass another run.name (run.resume=none refuses a folder that "
            "holds checkpoints)."
        )


def _normal(section: str, key: str, value: Any) -> Any:
    """Data roots compare as absolute paths."""
    if (section, key) == ("data", "root") and value:
        return str(Path(value).expanduser().resolve())
    return value


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
