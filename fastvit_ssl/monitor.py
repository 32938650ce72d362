"""Training metrics: a JSONL row per step, a progress line with img/s and ETA, TensorBoard if installed, PNG plots
of the curves at the end, and the stability monitor of the MoCo v3 paper: its instabilities hide inside runs that
look fine, as loss spikes, dips of kNN accuracy and spikes of the first layer's gradient (all plotted); spikes and
dips are also written to metrics.jsonl as events and logged."""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

from fastvit_ssl.progress import format_seconds

log = logging.getLogger(__name__)
LINE_SECONDS = 30.0  # the longest silence between progress lines


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
            self.rewind(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.bar = ProgressBar(total_steps, start_step) if enabled and sys.stderr.isatty() else None
        self.recent_losses: deque[float] = deque(maxlen=50)
        self.best_knn = float("-inf")

    def rewind(self, step: int) -> None:
        """Forget what was recorded after `step` (resume, rollback): the history never holds a step twice."""
        self.pending = []
        if self.enabled:
            rows = [r for r in read_metrics(self.path) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train_step(self, step: int, epoch: float, metrics: dict[str, torch.Tensor | float]) -> None:
        """Record step `step` (1-based); print a line every log_every steps, at least every LINE_SECONDS (slow steps
        on real data), and at the last step."""
        self.pending.append((step, epoch, metrics))
        self.window_steps += 1
        due = time.perf_counter() - self.window_start >= LINE_SECONDS
        if step % self.log_every and step != self.total_steps and not due:
            if self.bar is not None:
                self.bar.draw(step, self.images_per_step)
            return
        if self.bar is not None:
            self.bar.clear()
        elapsed = time.perf_counter() - self.window_start
        speed = self.window_steps * self.images_per_step / max(elapsed, 1e-9)
        self.window_start, self.window_steps = time.perf_counter(), 0
        last = self.flush(images_per_second=speed)
        eta = (self.total_steps - step) * self.images_per_step / max(speed, 1e-9)
        momentum = f" m {last['momentum']:.5f}" if "momentum" in last else ""  # methods with EMA networks
        log.info(
            "step %d/%d (epoch %.2f) loss %.4f lr %.3g%s grad %.3g | %.0f img/s | ETA %s",
            step,
            self.total_steps,
            last["epoch"],
            last["loss"],
            last["lr"],
            momentum,
            last["grad_norm"],
            speed,
            format_seconds(eta),
        )

    def flush(self, **last_row_extra) -> dict:
        """Write the buffered steps' rows to metrics.jsonl (at each log line, checkpoint, stop and the end), so a
        stopped run loses no row; returns the last row written ({} if none)."""
        rows = [{"step": s, "epoch": round(e, 4), **{k: float(v) for k, v in m.items()}} for s, e, m in self.pending]
        self.pending = []
        if not rows:
            return {}
        rows[-1].update(last_row_extra)
        self._write(rows + [event for r in rows if (event := self.loss_spike(r))])
        return rows[-1]

    def loss_spike(self, row: dict) -> dict | None:
        """An event when the loss exceeds 1.5x the median of the last 50 finite steps."""
        loss = row["loss"]
        if loss != loss or loss in (float("inf"), float("-inf")):
            return None
        median = statistics.median(self.recent_losses) if len(self.recent_losses) >= 20 else None
        self.recent_losses.append(loss)
        if median is None or loss <= 1.5 * median:
            return None
        log.warning("stability: loss spike at step %d (%.4f, median of the last steps %.4f)", row["step"], loss, median)
        return {"step": row["step"], "event": "loss_spike", "value": loss, "reference": median}

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation result (e.g. kNN top-1) at `step`; a kNN drop of 2 points below the best so far is an event."""
        rows = [{"step": step, **metrics}]
        knn = metrics.get("knn_top1")
        if knn is not None and step > 0:
            if knn < self.best_knn - 2.0:
                log.warning("stability: kNN dip at step %d (%.2f%%, best so far %.2f%%)", step, knn, self.best_knn)
                rows.append({"step": step, "event": "knn_dip", "value": knn, "reference": self.best_knn})
            self.best_knn = max(self.best_knn, knn)
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.tb is not None:
            for r in rows:
                for k, v in r.items():
                    if k != "step" and not isinstance(v, str):
                        self.tb.add_scalar(k, v, r["step"])

    def close(self) -> Path | None:
        """Write training_curves.png from the whole metrics history; returns its path."""
        self.flush()
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.close()
        return plot_metrics(read_metrics(self.path), self.path.parent / "training_curves.png")


class ProgressBar:
    """On a terminal, between the log lines: `[#####.......]  45% step 108/240 | 512 img/s | ETA 0m31s` on stderr,
    redrawn in place at most 5 times a second (no device sync: steps and wall time only)."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.started, self.last = total, start, time.perf_counter(), 0.0

    def draw(self, step: int, images_per_step: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.2:
            return
        self.last = now
        done = step / max(self.total, 1)
        speed = (step - self.start) * images_per_step / max(now - self.started, 1e-9)
        eta = (self.total - step) * images_per_step / max(speed, 1e-9)
        bar = "#" * int(24 * done)
        line = f"[{bar:<24}] {100 * done:3.0f}% step {step}/{self.total} | {speed:.0f} img/s"
        line += f" | ETA {format_seconds(eta)}"
        sys.stderr.write("\r" + line + "\033[K")
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process was killed while writing it) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(rows: list[dict], out: Path) -> Path | None:
    """One figure, a panel per recorded curve: loss (with spike events), kNN top-1 (with dips), gradient norms by
    layer (the first layer's spikes are the paper's early warning), lr and momentum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k for r in rows for k in r if k.startswith("grad/")})
    shown_layers = layers if len(layers) <= 6 else [layers[0], layers[len(layers) // 2], *layers[-3:]]
    parts = sorted({k for r in rows for k in r if k.startswith("loss/")})
    scheduled_wd = len({r["weight_decay"] for r in rows if "weight_decay" in r}) > 1
    panels = [
        ("loss", ["loss", *parts], "loss_spike"),
        ("kNN top-1 (%)", ["knn_top1"], "knn_dip"),
        ("gradient norm (total)", ["grad_norm"], None),
        ("gradient norm by layer", shown_layers, None),
        ("learning rate", ["lr"], None),
        ("momentum m", ["momentum"], None),
        *([("weight decay", ["weight_decay"], None)] if scheduled_wd else []),
    ]
    panels = [p for p in panels if any(k in r for r in rows for k in p[1])]
    if not panels:
        return None
    cols = min(3, len(panels))  # a grid, 3 panels a row: readable at any number of panels
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys, event) in zip(axes.flat, panels):
        for key in keys:
            points = sorted((r["step"], r[key]) for r in rows if key in r and "event" not in r)
            ax.plot(
                *zip(*points),
                marker="o" if len(points) < 30 else None,
                linewidth=1,
                label=key.removeprefix("grad/").removeprefix("loss/") if len(keys) > 1 else None,
            )
        marks = [(r["step"], r["value"]) for r in rows if event and r.get("event") == event]
        if marks:
            ax.scatter(*zip(*marks), color="red", marker="x", zorder=3, label=event.replace("_", " "))
        if len(keys) > 1 or marks:
            ax.legend(fontsize=7)
        if title.startswith("gradient norm by"):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
