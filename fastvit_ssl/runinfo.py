"""What a run folder records about how it was made: resolved config, git commit, library versions, machine."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
import yaml

from fastvit_ssl import config, distributed

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "triton", "numpy", "pillow", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "deepspeed")


def git_commit() -> str:
    """FASTVIT_SSL_COMMIT when set (a Docker image, which holds no .git; a copy of a checkout whose .git lags its
    files); else the commit of the source tree this code runs from ("+dirty" with uncommitted changes), or
    "unknown"."""
    if os.environ.get("FASTVIT_SSL_COMMIT"):
        return os.environ["FASTVIT_SSL_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def check_writable(folder: Path, what: str) -> None:
    """A ConfigError unless `folder` is, or can be made as, a folder this process writes to (its nearest existing
    ancestor is a writable folder), checked before anything is written."""
    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    problem = "is not a folder" if not existing.is_dir() else "is not writable"
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise config.ConfigError(
            f"{what} {folder} cannot be written: {existing} {problem}; pass a folder you can write to"
        )


def record_start(run_dir: Path, cfg: config.Config, device: torch.device, start_step: int) -> None:
    """Called once validation has passed. Appends this start to run_info.jsonl (git commit, versions, device,
    ranks, command, step); writes config.yaml at the first start. A resume whose settings differ from config.yaml
    (only those that may change: logging, workers, evaluation, ...) keeps it and saves its own beside it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "step": start_step,
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device_name(device),
        "world_size": distributed.world_size(),
        "command": sys.argv,
    }
    with open(run_dir / "run_info.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
    first = run_dir / "config.yaml"
    if not first.exists():
        config.save_yaml(cfg, first)
    else:
        before, now = config.from_dict(yaml.safe_load(first.read_text()) or {}).to_dict(), cfg.to_dict()
        changed = [f"{s}.{k}: {before[s][k]!r} -> {v!r}" for s in now for k, v in now[s].items() if before[s][k] != v]
        if changed:
            path = run_dir / f"config.resumed-step{start_step}.yaml"
            config.save_yaml(cfg, path)
            log.info("settings changed at this resume (%s): saved as %s", "; ".join(changed), path.name)
