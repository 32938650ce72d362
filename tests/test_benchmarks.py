"""The benchmark scripts run end to end at toy sizes and write the rows they promise (their numbers are not
checked: speed belongs in benchmarks/results, not in tests). A broken script would waste a lent GPU's window."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl.config import load
from fastvit_ssl.data.build import build_train_data
from fastvit_ssl.methods.base import PHASES
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.optim import schedules

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
sys.path.insert(0, str(REPO / "benchmarks"))

import throughput  # noqa: E402


def run_script(name: str, args: list[str], out: Path) -> list[dict]:
    command = [sys.executable, str(REPO / "benchmarks" / name), *args, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with out.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["mocov3", "sit", "beit", "mae", "dino"])
def test_throughput_compares_ours_on_uint8_views_with_the_baseline(tmp_path, method):
    args = ["--compare", "--arch", "vit_demo", "--img-size", "28", "--batch", "8", "--steps", "1", "--uint8-views"]
    rows = run_script("throughput.py", [*args, "--method", method], tmp_path / "throughput.csv")
    assert [(r["form"], r["views"], r["method"], r["attention"]) for r in rows] == [
        ("ours (auto, eager)", "uint8", method, "auto"),
        ("baseline (timm 0.4.9 attention)", "float", method, "explicit"),
        ("baseline (SDPA)", "float", method, "auto"),
    ]
    for r in rows:
        assert float(r["images_per_second"]) > 0 and float(r["step_ms"]) > 0 and float(r["MFU"]) > 0
        assert float(r["warmup_s"]) > 0
        # every phase is marked from inside the step (methods without EMA mark an empty one)
        assert all(float(r[f"{phase} ms"]) >= 0 for phase in PHASES)
    assert (tmp_path / "throughput.json").exists()


def test_a_failing_variant_is_reported_and_the_others_measured(monkeypatch, capsys):
    """One variant that breaks (a compiler or kernel error on a GPU) must not cost the rest of the matrix."""
    step = throughput.Bench.step

    def breaks_with_math(bench):
        if bench.setup.attention == "math":
            raise RuntimeError("kernel failed")
        step(bench)

    monkeypatch.setattr(throughput.Bench, "step", breaks_with_math)
    setups = [throughput.Setup("vit_demo", 8, 28, "fp32", "reference", a) for a in ("auto", "math")]
    rows = throughput.run(setups, CPU, steps=1, peak=1.0, max_batch=False)
    assert [r["form"] for r in rows] == ["ours (auto, eager)"]
    printed = capsys.readouterr().out
    assert "failed, left out: ours (math, eager) mocov3 vit_demo: RuntimeError: kernel failed" in printed


def test_the_largest_batch_is_extrapolated_from_two_peaks_and_checked(monkeypatch):
    """A fake GPU of 100 GB of which 90 are usable, a step needing 4 GB + 0.1 GB per image (2% more per image above
    800: fragmentation). From the peaks at 64 and 128 images the guess fills 95 GB: (95 - 16.8) / 0.1 + 128 = 910,
    904 in multiples of 8; it runs out of memory, and a tenth less, 808 (86.4 GB), fits."""
    memory, peak = 100e9, [0]

    class FakeBench:
        def __init__(self, setup, device):
            self.views = []

        def synthetic_views(self, batch):
            return [batch]

        def step(self):
            batch = self.views[0]
            if 4e9 + 0.1e9 * batch * (1.02 if batch > 800 else 1.0) > 0.9 * memory:
                raise torch.cuda.OutOfMemoryError("out of memory")
            peak[0] = 4e9 + 0.1e9 * batch

    for name, fake in {
        "reset_peak_memory_stats": lambda: None,
        "max_memory_allocated": lambda: peak[0],
        "empty_cache": lambda: None,
        "synchronize": lambda: None,
        "get_device_properties": lambda device: type("Properties", (), {"total_memory": memory}),
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(throughput, "Bench", FakeBench)
    setup = throughput.Setup("vit_base", 128, 224, "bf16")
    assert throughput.largest_batch(setup, torch.device("cuda")) == 808


def test_the_benchmark_times_the_step_train_py_runs(tiny_overrides):
    """throughput.py's step is the engine's, built as train.py builds it: after train.py's first step and the
    benchmark's on the same batch with the same hyperparameters, the same loss and weights, bit for bit."""
    overrides = [*tiny_overrides, "run.stop_at_step=1", "eval.knn_every_epochs=0"]
    summary = train.main(overrides)
    cfg = load(train.DEFAULT_CONFIG, overrides)  # what train.main(overrides) loads
    ours = throughput.Ours(cfg, CPU)
    method = type(ours.model)
    loader = build_train_data(cfg, Path(cfg.data.root), CPU, method.views(cfg))[0]
    loader.start(0)
    views = next(iter(loader)).views
    hparams = schedules.Schedules(cfg, method, loader.batches_per_epoch).at(0)
    loss = ours.engine.step(views, 0, hparams)[0]["loss"]
    first = next(r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r)
    assert loss.item() == first["loss"]
    stored = torch.load(summary["checkpoint"], weights_only=False)["model"]
    assert stored.keys() == ours.model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in ours.model.state_dict().items())


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
    files = ["kernel_tests.txt", "throughput-compiled-default.csv", "largest-batch.csv", "DECISION.md", "data.csv"]
    for name in [*files, "fp16.txt", *(f"throughput-{i}.csv" for i in range(3))]:
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "throughput-decision.csv").open() as f:
        rows = [(r["form"], r["compiled"]) for r in csv.DictReader(f)]
    assert rows == [  # efficient attention has no CPU kernel: skipped with a message
        ("ours (auto, eager)", "eager"),
        ("ours (math, eager)", "eager"),
        ("ours (flash, eager)", "eager"),
        ("baseline (timm 0.4.9 attention)", "eager"),
        ("baseline (SDPA)", "eager"),
    ]
    assert "| mocov3 | vit_demo |" in (tmp_path / "DECISION.md").read_text()
    assert "run folder" in (tmp_path / "fp16.txt").read_text()  # the local engine trained in fp16


def test_lm_head_memory_measures_both_heads(tmp_path):
    """2,048 x 8,192 fp32 logits are 64 MiB: the plain head holds two such matrices at once (logits and their
    log-softmax, then its gradient), the fused one a chunk of rows at a time and never one whole matrix. Counted
    tensor bytes, not resident memory: the same on any machine, busy or not (measured 193 against 3 MiB)."""
    rows = run_script("lm_head_memory.py", ["--rows", "2048", "--dim", "32", "--vocab", "8192"], tmp_path / "m.csv")
    peaks = {r["impl"]: float(r["peak_extra_MiB"]) for r in rows}
    assert peaks["reference"] >= 128 and peaks["fused"] < 64, peaks
