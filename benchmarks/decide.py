"""The GPU suite's decision table: from the throughput rows of a results folder, per method and ViT the fastest of
our variants (attention kernel x compile mode), its ratio to each form of the baseline, its peak memory, and the
settings the GPU configs should then take. Written to DECISION.md in that folder and printed.

    python benchmarks/decide.py benchmarks/results/<date>-<gpu>
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from fastvit_ssl.methods.base import METHODS

GOALS = {(m.name, arch): goal for m in METHODS.values() for arch, _, goal in m.suite}  # ours / official, one GPU


def read_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("throughput*.csv")):
        with path.open() as f:
            rows += [{**r, "file": path.name} for r in csv.DictReader(f)]
    return rows


def decide(rows: list[dict]) -> list[dict]:
    """One line per (method, arch, batch): the best ours variant against each baseline form."""
    cases = defaultdict(lambda: {"ours": [], "baseline": []})
    for r in rows:
        cases[r["method"], r["arch"], r["batch"]][r["mode"]].append(r)
    table = []
    for (method, arch, batch), found in cases.items():
        if not found["ours"]:
            continue
        best = max(found["ours"], key=lambda r: float(r["images_per_second"]))
        line = {
            "method": method,
            "arch": arch,
            "batch": batch,
            "best ours": best["form"],
            "img/s": best["images_per_second"],
            "MFU": best["MFU"],
            "peak GiB": best["peak_memory_GiB"],
            "warm-up s": best["warmup_s"],
            "settings": f"model.attention={best['attention']}"
            + (f" model.compile=true model.compile_mode={best['compiled']}" if best["compiled"] != "eager" else ""),
        }
        # the baseline timed in the same run as the best, alternating with it: the pair shared the machine's state
        for base in [b for b in found["baseline"] if b["file"] == best["file"]]:
            ratio = float(best["images_per_second"]) / float(base["images_per_second"])
            line[f"x {base['form']}"] = f"{ratio:.2f}"
        goal = GOALS.get((method, arch))
        if goal is not None:
            verdicts = [
                f"{'met' if float(v) >= goal else 'not met'} ({k[2:]})" for k, v in line.items() if k[:2] == "x "
            ]
            line["goal"] = f"{goal}x: " + ", ".join(verdicts)
        table.append(line)
    return table


def markdown(table: list[dict]) -> str:
    columns = list(dict.fromkeys(k for line in table for k in line))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(line.get(c, "")) for c in columns) + " |" for line in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a results folder with throughput*.csv files")
    args = parser.parse_args(argv)
    table = decide(read_rows(args.folder))
    text = (
        "# Decision table (benchmarks/decide.py)\n\nThe fastest of our variants per case against the official "
        "recipe in both forms (timm 0.4.9's attention as the official MoCo v3 pins it; torch's SDPA).\n\n"
        + (markdown(table) if table else "no throughput rows found\n")
    )
    (args.folder / "DECISION.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
