"""How every evaluation command ends: its result as one JSON line on stdout (progress goes to stderr)."""

from __future__ import annotations

import json
import time


def print_result(result: dict, started: float) -> dict:
    """Add the wall time since `started` (a time.perf_counter() reading), print the result, return it."""
    result = {**result, "wall_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    return result
