"""The benchmark scripts run end to end at toy sizes and write the rows they promise (their numbers are not
checked: speed belongs in benchmarks/results, not in tests). A broken script would waste a lent GPU's window."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, args: list[str], out: Path) -> list[dict]:
    command = [sys.executable, str(REPO / "benchmarks" / name), *args, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with out.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["mocov3", "sit", "beit"])
def test_throughput_compares_ours_on_uint8_views_with_the_baseline(tmp_path, method):
    args = ["--compare", "--arch", "vit_demo", "--img-size", "28", "--batch", "8", "--steps", "1", "--uint8-views"]
    rows = run_script("throughput.py", [*args, "--method", method], tmp_path / "throughput.csv")
    assert [(r["mode"], r["views"], r["method"]) for r in rows] == [
        ("ours", "uint8", method),
        ("baseline", "float", method),
    ]
    for r in rows:
        assert float(r["images_per_second"]) > 0 and float(r["step_ms"]) > 0 and float(r["MFU"]) > 0
        phases = ("data", "prepare", "forward", "ema", "targets", "loss", "backward", "optimizer")
        assert all(float(r[f"{phase} ms"]) >= 0 for phase in phases)
    assert (tmp_path / "throughput.json").exists()


def test_data_rates_each_backend_and_output(tmp_path):
    args = ["--images", "24", "--batch", "4", "--warmup", "1", "--batches", "2", "--size", "32", "--threads", "1"]
    rows = run_script("data.py", args, tmp_path / "data.csv")
    outputs = {(r["backend"].split()[0], r["output"]) for r in rows}
    assert {("torch", "float"), ("torch", "uint8")} <= outputs
    assert all(float(r["images_per_second"]) > 0 and r["views"] == "2" for r in rows)


def test_gpu_suite_rehearsal_runs_every_part(tmp_path):
    """The lent-GPU suite at toy sizes on this CPU: it must not fail on its own plumbing when a GPU comes."""
    env = {**os.environ, "SUITE_REHEARSAL": "1"}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in ("kernel_tests.txt", "kernels.csv", "throughput.csv", "throughput-compiled-0.csv", "data.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "throughput-compiled-0.csv").open() as f:
        assert [r["compiled"] for r in csv.DictReader(f)] == ["True", "False"]  # ours compiled, the baseline eager


def test_lm_head_memory_measures_both_heads(tmp_path):
    """2,048 x 8,192 fp32 logits are 64 MiB: the plain head holds two such matrices at once (logits and their
    log-softmax, then its gradient), the fused one a chunk of rows at a time and never one whole matrix. Counted
    tensor bytes, not resident memory: the same on any machine, busy or not (measured 193 against 3 MiB)."""
    rows = run_script("lm_head_memory.py", ["--rows", "2048", "--dim", "32", "--vocab", "8192"], tmp_path / "m.csv")
    peaks = {r["impl"]: float(r["peak_extra_MiB"]) for r in rows}
    assert peaks["reference"] >= 128 and peaks["fused"] < 64, peaks
