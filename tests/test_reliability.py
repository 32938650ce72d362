"""Reliability with real processes and real signals: kill -9 at any moment and resume exactly, the non-finite step
guard (NaN injected from outside the engines: tests/faults.py), a dying rank, the stability monitor, bad input on the
command line."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch

import train
from fastvit_ssl import checkpoint
from fastvit_ssl.guard import TrainingDiverged
from fastvit_ssl.monitor import Monitor, read_metrics
from launch import ENV_1_THREAD, TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]
FAULTY_TRAIN = REPO / "tests" / "faulty_train.py"  # train.py with the faults of the environment


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def command(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


ENV = ENV_1_THREAD  # the same threads in every run, so float sums are reduced alike


def run_until_killed(overrides: list[str], kill_after_step: int, cwd: Path) -> int:
    """Start train.py, SIGKILL it right after it logs `kill_after_step` (while it checkpoints), return the code."""
    process = subprocess.Popen(
        command(overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=ENV
    )
    for line in process.stdout:
        if f" step {kill_after_step}/" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    return process.returncode


def test_kill_9_at_any_moment_then_the_same_command_resumes_exactly(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "optim.epochs=4", "run.ckpt_every=1", "eval.knn_every_epochs=0"]
    runs = Path(next(o for o in overrides if o.startswith("run.out_dir=")).split("=", 1)[1])
    reference = subprocess.run(
        command([*overrides, "run.name=uninterrupted"]),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    for kill_after in (2, 5, 9):  # early, mid-epoch, later: each time while the checkpoint of that step is written
        assert run_until_killed(overrides, kill_after, tmp_path) == -signal.SIGKILL
    final = subprocess.run(command(overrides), capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert losses(runs / "tiny") == losses(runs / "uninterrupted")  # steps 1..12, bit for bit
    assert json.loads((runs / "tiny" / "summary.json").read_text())["steps"] == 12


def test_an_isolated_non_finite_step_is_skipped(tiny_overrides, monkeypatch):
    faults.install(nan_at={3}, patch=monkeypatch.setattr)
    summary = train.main([*tiny_overrides, "eval.knn_every_epochs=0"])
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 0 and summary["steps"] == 6
    rows = {r["step"]: r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r}
    assert math.isnan(rows[3]["loss"]) and rows[3]["finite"] == 0.0
    assert all(math.isfinite(rows[s]["loss"]) for s in rows if s != 3)


def test_consecutive_non_finite_steps_roll_back_with_a_lower_lr(tiny_overrides, monkeypatch, caplog):
    faults.install(nan_at={4, 5}, patch=monkeypatch.setattr)
    summary = train.main([*tiny_overrides, "run.max_bad_steps=2", "run.ckpt_every=2", "eval.knn_every_epochs=0"])
    assert summary["rollbacks"] == 1 and summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert "rolled back to" in caplog.text and "(step 4)" in caplog.text  # its newest checkpoint
    run_dir = Path(summary["run_dir"])
    history = losses(run_dir)  # rows after the rollback point were replaced by the new attempt
    assert sorted(history) == list(range(1, 7)) and math.isnan(history[4])
    assert all(math.isfinite(history[s]) for s in (1, 2, 3, 5, 6))
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    assert state["lr_scale"] == 0.5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_policy_stop_ends_the_run_with_a_message(tiny_overrides, monkeypatch, tmp_path):
    faults.install(nan_at={2, 3, 4}, patch=monkeypatch.setattr)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 4"):
        train.main([*tiny_overrides, "run.on_nonfinite=stop", "run.ckpt_every=1"])
    result = subprocess.run(
        [sys.executable, str(FAULTY_TRAIN), *tiny_overrides, "run.on_nonfinite=stop", "run.name=cli"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "FAULT_NAN_AT": "1,2,3"},
        timeout=300,
    )
    assert result.returncode == 2 and "error: 3 non-finite steps in a row" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dying_rank_ends_the_run_and_is_named(tiny_overrides, tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [
            *TORCHRUN_2,
            str(FAULTY_TRAIN),
            *tiny_overrides,
            "engine.timeout_s=60",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT_DIE_AT": "1:3"},
    )
    assert result.returncode != 0 and time.perf_counter() - started < 120
    output = result.stdout + result.stderr
    assert "rank      : 1" in output or "rank: 1" in output, output[-2000:]


def test_stability_monitor_flags_loss_spikes_and_knn_dips(tmp_path):
    monitor = Monitor(tmp_path, total_steps=100, images_per_step=8, log_every=1)
    for step in range(1, 41):
        monitor.train_step(
            step, step / 10, {"loss": 4.0 if step != 35 else 9.0, "grad_norm": 1.0, "lr": 0.1, "momentum": 0.99}
        )
    for step, knn in ((10, 50.0), (20, 60.0), (30, 55.0)):
        monitor.record(step, {"knn_top1": knn})
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("loss_spike", 35), ("knn_dip", 30)]
    assert monitor.close().stat().st_size > 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.root=/nonexistent"], "data.root=/nonexistent must contain a train/ folder"),
        (["model.arch=vit_giant"], "model.arch = 'vit_giant' is not one of"),
        (["data.min_scale=1.5"], "data.min_scale must lie in (0, 1]"),
        (["run.resume=/no/such.pt"], "checkpoint /no/such.pt does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tiny_overrides, tmp_path, overrides, message):
    result = subprocess.run(
        command([*tiny_overrides, *overrides]), capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_class_folders_and_empty_data_are_named(tmp_path):
    (tmp_path / "empty" / "train" / "cats").mkdir(parents=True)
    result = subprocess.run(
        command([f"data.root={tmp_path / 'empty'}", f"run.out_dir={tmp_path / 'runs'}"]),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2 and "no images" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_outside_the_training_steps_is_one_line(tmp_path):
    """Set-up, a tokenizer's training, the final evaluation: Python's own SIGINT handler is in force there."""
    script = "import os, signal\nfrom fastvit_ssl.cli import run\nrun(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stderr.splitlines() == [
        "interrupted (Ctrl-C) where nothing is saved (outside the training steps); rerun the same command: training "
        "continues from the newest checkpoint in its run folder"
    ]
