"""Stopping early without losing work, and run folders that are never clobbered.

The fault matrix: a signal at some step (sent by the process to itself, as a launcher or scheduler would, through
tests/faulty_train.py: FAULT_SIGNAL_AT) x {Pillow, DALI ImageFolder, DALI webdataset} x {one process, torchrun with
2 ranks, the deepspeed launcher with ZeRO-2 on gloo}: the run saves, says how to continue and exits 3; the same
command then finishes it with the per-step losses of an uninterrupted run (DeepSpeed: every step once, finite), no
metric row lost.
"""

import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl.checkpoint import IncompatibleCheckpoint
from fastvit_ssl.config import load
from fastvit_ssl.data.folder import DataError
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.preemption import RESUMABLE_EXIT, EarlyStop
from launch import ENV_1_THREAD, TORCHRUN_2, deepspeed_launcher_2

REPO = Path(__file__).resolve().parents[1]
EVAL_OFF = ["eval.knn_every_epochs=0", "optim.epochs=3"]  # 9 steps of batch 8


def rows(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step recorded twice fails."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len({r["step"] for r in steps}) == len(steps), "a step recorded twice"
    return {r["step"]: r["loss"] for r in steps}


def webdataset_root(dataset_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    (root / "train").mkdir(parents=True)
    with tarfile.open(root / "train" / "shard-0.tar", "w") as tar:
        for i, path in enumerate(sorted((dataset_root / "train").rglob("*.jpg"))):
            tar.add(path, arcname=f"{i:06d}.jpg")
    return root


def launch(launcher: str, overrides: list[str], cwd: Path, signal_at: str = "") -> subprocess.CompletedProcess:
    prefix = {
        "local": [sys.executable],
        "torchrun": TORCHRUN_2,
        "deepspeed": deepspeed_launcher_2(),
    }[launcher]
    env = {**ENV_1_THREAD, "FAULT_SIGNAL_AT": signal_at}
    script = REPO / "tests" / "faulty_train.py"
    return subprocess.run(
        [*prefix, str(script), *overrides], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


MATRIX = [  # pipeline, launcher, signal "rank:step:name"
    ("torch", "local", "0:5:SIGTERM"),
    ("dali", "local", "0:5:SIGTERM"),
    ("webdataset", "local", "0:4:SIGINT"),
    ("torch", "torchrun", "1:5:SIGTERM"),  # one rank signalled: both stop after the same step
    ("torch", "deepspeed", "0:4:SIGTERM"),
]


@pytest.mark.parametrize("pipeline, launcher, signal_at", MATRIX, ids=lambda v: str(v))
def test_a_signal_saves_says_how_to_continue_and_the_rerun_finishes_exactly(
    pipeline, launcher, signal_at, tiny_overrides, dataset_root, tmp_path
):
    if pipeline != "torch":
        pytest.importorskip("nvidia.dali")
    overrides = [*tiny_overrides, *EVAL_OFF, f"data.backend={'torch' if pipeline == 'torch' else 'dali'}"]
    if pipeline == "webdataset":
        overrides.append(f"data.root={webdataset_root(dataset_root, tmp_path)}")
    if launcher == "deepspeed":
        overrides += ["engine.name=deepspeed", "engine.zero_stage=2", "optim.name=lars"]
    runs = tmp_path / "runs"
    if launcher != "deepspeed":  # its resumed losses are checked for completeness and finiteness only
        reference = launch(launcher, [*overrides, "run.name=uninterrupted"], tmp_path)
        assert reference.returncode == 0, reference.stderr[-3000:]

    stopped = launch(launcher, overrides, tmp_path, signal_at)
    name = signal_at.rsplit(":", 1)[1]
    assert f"{name}: stopped at step" in stopped.stderr, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert "rerun the same command to continue" in stopped.stderr
    assert stopped.stderr.count("stopped at step") == 1  # printed once, by rank 0
    if launcher == "local":
        assert stopped.returncode == RESUMABLE_EXIT and "Traceback" not in stopped.stderr
    step = int(stopped.stderr.split("stopped at step ")[1].split(";")[0])
    assert 1 <= step < 9 and sorted(rows(runs / "tiny")) == list(range(1, step + 1))  # no row lost

    final = launch(launcher, overrides, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"(step {step})" in final.stdout
    if launcher == "deepspeed":  # fp32 here, but ZeRO's reduction order is not promised: every step once, finite
        resumed = rows(runs / "tiny")
        assert sorted(resumed) == list(range(1, 10)) and all(torch.isfinite(torch.tensor(list(resumed.values()))))
    else:
        assert rows(runs / "tiny") == rows(runs / "uninterrupted")  # bit for bit


def test_the_logged_loss_under_torchrun_is_the_global_batchs(tiny_overrides, tmp_path):
    """Each rank's loss covers its half of the batch; the metrics hold their mean, the one process's loss. fp32:
    the same loss summed in another order differs by rounding (unit roundoff 6e-8, measured 5e-8 relative); rank 0's
    half alone differs by ~3e-3 (4.4909 vs 4.4792 on the demo)."""
    overrides = [*tiny_overrides, *EVAL_OFF, "run.stop_at_step=2"]
    for launcher in ("local", "torchrun"):
        result = launch(launcher, [*overrides, f"run.name={launcher}"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = rows(tmp_path / "runs" / "local"), rows(tmp_path / "runs" / "torchrun")
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def test_the_same_signal_twice_exits_at_once_another_does_not(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from fastvit_ssl.preemption import StopRequests\n"
        "with StopRequests() as stops:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding the terminal's Ctrl-C\n"
        "    print(stops.reason(None), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('still running', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.splitlines() == ["SIGINT"]
    assert result.returncode == -signal.SIGINT


def test_the_wall_clock_budget_stops_like_a_signal(tiny_overrides):
    with pytest.raises(EarlyStop, match=r"the budget of run.max_minutes=1e-06: stopped at step 1; checkpoint"):
        train.main([*tiny_overrides, *EVAL_OFF, "run.max_minutes=0.000001"])
    summary = train.main([*tiny_overrides, *EVAL_OFF])
    assert summary["steps"] == 9 and sorted(rows(Path(summary["run_dir"]))) == list(range(1, 10))


def test_a_stop_between_log_lines_loses_no_metric_row(tiny_overrides):
    train.main([*tiny_overrides, *EVAL_OFF, "run.log_every=3", "run.stop_at_step=5"])
    summary = train.main([*tiny_overrides, *EVAL_OFF, "run.log_every=3"])
    assert sorted(rows(Path(summary["run_dir"]))) == list(range(1, 10))


def test_the_default_run_name_comes_from_the_config_and_the_data(tmp_path):
    demo = REPO / "configs" / "demo.yaml"
    assert load(demo, []).run.name == "demo"
    assert load(demo, [f"data.root={tmp_path / 'my_photos'}"]).run.name == "demo-my_photos"
    assert load(demo, [f"data.root={tmp_path}", "run.name=mine"]).run.name == "mine"


def test_a_resume_with_other_settings_names_them_and_writes_nothing(tiny_overrides):
    first = train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=2"])
    run_dir = Path(first["run_dir"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(IncompatibleCheckpoint) as error:
        train.main([*tiny_overrides, *EVAL_OFF, "data.batch_size=4", "optim.warmup_epochs=2"])
    message = str(error.value)
    assert "data.batch_size: checkpoint 8, this run 4" in message and "optim.warmup_epochs: checkpoint 1" in message
    assert "another run.name" in message
    trajectory = ["optim.base_lr=0.05", "optim.name=lars", "run.seed=7", "data.min_scale=0.9"]  # exact resume
    with pytest.raises(IncompatibleCheckpoint) as error:
        train.main([*tiny_overrides, *EVAL_OFF, *trajectory])
    for key in ("optim.base_lr", "optim.name", "run.seed", "data.min_scale"):
        assert f"{key}: checkpoint" in str(error.value)
    with pytest.raises(DataError):
        train.main([*tiny_overrides, *EVAL_OFF, "data.root=/nonexistent/folder", "run.name=tiny"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # untouched


def test_a_resume_may_change_how_the_model_runs_not_what_it_is(tiny_overrides):
    """specs.MODEL_KEYS: what defines the model; activation checkpointing, the attention kernel and compilation may
    change between starts (e.g. checkpointing turned on after an out-of-memory error)."""
    train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=2"])
    with pytest.raises(IncompatibleCheckpoint, match="model.num_heads: checkpoint 3, this run 1"):
        train.main([*tiny_overrides, *EVAL_OFF, "model.num_heads=1"])
    how = ["model.grad_checkpointing=true", "model.attention=math", "model.compile=true"]
    assert train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=3", *how])["steps"] == 3
    summary = train.main([*tiny_overrides, *EVAL_OFF])
    starts = [
        json.loads(line)["step"] for line in (Path(summary["run_dir"]) / "run_info.jsonl").read_text().splitlines()
    ]
    assert starts == [0, 2, 3] and summary["steps"] > 3


def test_a_resume_records_its_start_and_keeps_the_first_config(tiny_overrides, caplog):
    train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=2"])
    summary = train.main([*tiny_overrides, *EVAL_OFF, "run.log_every=2"])
    run_dir = Path(summary["run_dir"])
    starts = [json.loads(line) for line in (run_dir / "run_info.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 2] and starts[0]["git_commit"]
    assert "log_every: 1" in (run_dir / "config.yaml").read_text()
    assert "log_every: 2" in (run_dir / "config.resumed-step2.yaml").read_text()
    assert "settings changed at this resume (run.log_every: 1 -> 2; run.stop_at_step: 2 -> 0)" in caplog.text


def test_evaluation_without_a_val_folder_is_one_line(tiny_overrides, dataset_root, tmp_path, caplog):
    summary = train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=1"])
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(dataset_root / "train")
    for tool in ("knn", "linear"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                f"fastvit_ssl.eval.{tool}",
                "--checkpoint",
                summary["run_dir"],
                "--data",
                str(only_train),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=ENV_1_THREAD,
            timeout=120,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{only_train / 'val'} missing: pass --data with a folder holding both" in result.stderr
    train.main([*tiny_overrides, *EVAL_OFF, "run.stop_at_step=1", f"data.root={only_train}", "run.name=no_val"])
    assert f"no kNN evaluation and no pictures: they need labelled images in {only_train}/val/" in caplog.text


def test_a_config_error_under_torchrun_is_printed_once(tiny_overrides, tmp_path):
    result = subprocess.run(
        [*TORCHRUN_2, str(REPO / "train.py"), *tiny_overrides, "optim.base_lr=-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV_1_THREAD,
        timeout=300,
    )
    assert result.returncode != 0 and result.stderr.count("error: ") == 1, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
