"""Training metrics: a JSONL row per step, a progress line with img/s and ETA, TensorBoard if installed, and
PNG plots of the curves at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Monitor:
    """Buffers per-step tensors and converts them once per `log_every` steps (one device sync per interval).

    Args:
        run_dir: where metrics.jsonl and the plots go.
        total_steps: for the ETA.
        images_per_step: global batch size, for img/s.
        log_every: steps between progress lines.
        start_step: rows after it (from an interrupted run) are dropped, so a resumed history has no duplicates.
        enabled: False on ranks other than 0.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        images_per_step: int,
        log_every: int,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.total_steps, self.images_per_step, self.log_every = total_steps, images_per_step, log_every
        self.enabled, self.path, self.pending = enabled, run_dir / "metrics.jsonl", []
        self.tb = None
        if enabled:
            rows = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass
        self.window_start, self.window_steps = time.perf_counter(), 0

    def train_step(self, step: int, epoch: float, metrics: dict[str, torch.Tensor | float]) -> None:
        """Record step `step` (1-based); print a line every log_every steps and at the last step."""
        self.pending.append((step, epoch, metrics))
        self.window_steps += 1
        if step % self.log_every and step != self.total_steps:
            return
        rows = [{"step": s, "epoch": round(e, 4), **{k: float(v) for k, v in m.items()}} for s, e, m in self.pending]
        elapsed = time.perf_counter() - self.window_start
        speed = self.window_steps * self.images_per_step / max(elapsed, 1e-9)
        rows[-1]["images_per_second"] = speed
        self.pending, self.window_start, self.window_steps = [], time.perf_counter(), 0
        self._write(rows)
        last = rows[-1]
        eta = (self.total_steps - step) * self.images_per_step / max(speed, 1e-9)
        log.info(
            "step %d/%d (epoch %.2f) loss %.4f lr %.3g m %.5f grad %.3g | %.0f img/s | ETA %s",
            step,
            self.total_steps,
            last["epoch"],
            last["loss"],
            last["lr"],
            last["momentum"],
            last["grad_norm"],
            speed,
            format_seconds(eta),
        )

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation result (e.g. kNN top-1) at `step`."""
        self._write([{"step": step, **metrics}])

    def _write(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.tb is not None:
            for r in rows:
                for k, v in r.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, r["step"])

    def close(self) -> Path | None:
        """Write training_curves.png from the whole metrics history; returns its path."""
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.close()
        return plot_metrics(read_metrics(self.path), self.path.parent / "training_curves.png")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict], out: Path) -> Path | None:
    """One figure, a panel per curve that was recorded: loss, kNN top-1, grad norm, lr and momentum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "contrastive loss"),
        ("knn_top1", "kNN top-1 (%)"),
        ("grad_norm", "gradient norm"),
        ("lr", "learning rate"),
        ("momentum", "momentum m"),
    ]
    panels = [(k, title) for k, title in panels if any(k in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = sorted((r["step"], r[key]) for r in rows if key in r)
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
