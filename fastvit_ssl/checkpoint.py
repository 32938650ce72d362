"""Checkpoints: atomic writes, newest-first discovery for resume=auto, weights-only loading, clear mismatches."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is readable but was written for another model."""


def path_for(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:08d}.pt"


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in the run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep_last: int, protect: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` checkpoints (and those in `protect`)."""
    for old in list_checkpoints(run_dir)[: -keep_last or None]:
        if old not in protect:
            old.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, no arbitrary pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises several types for torn or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
            "it may be damaged or not a fastvit_ssl checkpoint"
        ) from None


def check_compatible(stored_cfg: dict[str, Any], current_cfg: dict[str, Any], path: Path) -> None:
    """The model and method sections decide the parameter shapes: they must match."""
    for section in ("model", "moco"):
        stored, current = stored_cfg.get(section, {}), current_cfg[section]
        diffs = [
            f"{section}.{k}: checkpoint {stored.get(k)!r}, this run {v!r}"
            for k, v in current.items()
            if stored.get(k) != v
        ]
        if diffs:
            raise IncompatibleCheckpoint(
                f"checkpoint {path} was written for another model ({'; '.join(diffs)}). "
                "Use the checkpoint's settings, or start a new run (another run.name, or resume=none)."
            )


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
