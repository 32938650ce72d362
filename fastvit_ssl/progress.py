"""A progress line for long work outside the training loop (feature extraction, fine-tuning, data checks): items
done of the total, items per second and the ETA, on stderr (stdout stays the commands' result), at most every
`every_s` seconds, so that short work stays quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """`update(n)` after each chunk of work (or `track(items)`); a line such as
    `kNN features: 51200/1281167 images | 2210 images/s | ETA 9m17s | loss 2.31` when `every_s` has passed since
    the last line, and a last one at the end if any was printed."""

    def __init__(self, what: str, total: int, unit: str = "images", every_s: float = 10.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done, self.printed = 0, False
        self.started = self.last = time.perf_counter()

    def track(self, items: Iterable) -> Iterator:
        """The items, one update per item."""
        for item in items:
            yield item
            self.update()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.done >= self.total
        if now - self.last < self.every_s and not (finished and self.printed):
            return
        self.last, self.printed = now, True
        rate = self.done / max(now - self.started, 1e-9)
        eta = max(self.total - self.done, 0) / max(rate, 1e-9)
        line = (
            f"{self.what}: {self.done}/{self.total} {self.unit} | {rate:.0f} {self.unit}/s | ETA {format_seconds(eta)}"
        )
        print(line + (f" | {note}" if note else ""), file=sys.stderr, flush=True)
