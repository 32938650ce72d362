"""End-to-end pre-training runs of a few CPU seconds through train.main."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import train
from fastvit_ssl import checkpoint
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.monitor import read_metrics
from launch import ENV_1_THREAD, TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]
SIT = [
    "method.name=sit",
    "sit.dim=16",
    "sit.mlp_dim=32",
    "model.pos_embed=learned",
    "model.init=trunc_normal",
    "model.frozen_patch_embed=false",
]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_tiny_run_writes_summary_metrics_plot_and_checkpoint(tiny_overrides, capsys):
    summary = train.main(["--config", str(REPO / "configs/demo.yaml"), *tiny_overrides])
    run_dir = Path(summary["run_dir"])
    assert summary["steps"] == 6  # 24 images / batch 8 = 3 steps per epoch, 2 epochs
    for key in ("knn_top1_random", "knn_top1_pretrained", "wall_seconds", "images_per_second", "checkpoint"):
        assert key in summary
    assert 0 <= summary["knn_top1_pretrained"] <= 100
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert "kNN top-1: random-init" in capsys.readouterr().out
    assert sorted(losses(run_dir)) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run_dir).values())
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    info = json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[0])
    assert info["git_commit"] and info["versions"]["torch"] == torch.__version__
    assert "model:" in (run_dir / "config.yaml").read_text()
    state = checkpoint.load(Path(summary["checkpoint"]))
    assert state["step"] == 6 and "momentum_encoder.blocks.0.attn.qkv.weight" in state["model"]


def test_resumed_run_reproduces_the_uninterrupted_losses(tiny_overrides):
    eval_off = ["eval.knn_every_epochs=0"]
    full = train.main([*tiny_overrides, *eval_off, "run.name=full"])
    first = train.main([*tiny_overrides, *eval_off, "run.name=cut", "run.stop_at_step=4"])  # mid-epoch 2
    assert first["steps"] == 4 and "knn_top1_pretrained" not in first
    resumed = train.main([*tiny_overrides, *eval_off, "run.name=cut"])
    assert resumed["steps"] == 6
    assert losses(Path(resumed["run_dir"])) == losses(Path(full["run_dir"]))  # bit for bit, steps 1..6
    beyond = train.main([*tiny_overrides, *eval_off, "run.name=beyond", "run.stop_at_step=100"])
    assert beyond["steps"] == 6 and losses(Path(beyond["run_dir"])) == losses(Path(full["run_dir"]))  # no step 7


def test_checkpoint_of_another_model_is_refused(tiny_overrides):
    train.main([*tiny_overrides, "run.stop_at_step=1"])
    with pytest.raises(CheckpointError, match="model.global_pool: checkpoint 'token', this run 'avg'"):
        train.main([*tiny_overrides, "model.global_pool=avg"])
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train.main([*tiny_overrides, "run.resume=none"])
    with pytest.raises(CheckpointError, match="method.name: checkpoint 'mocov3', this run 'sit'"):
        train.main([*tiny_overrides, *SIT])


def test_sit_trains_writes_its_pictures_and_resumes_exactly(tiny_overrides):
    full = train.main([*tiny_overrides, *SIT, "run.name=sit-full"])
    run_dir = Path(full["run_dir"])
    assert full["steps"] == 6 and 0 <= full["knn_top1_pretrained"] <= 100
    assert (run_dir / "reconstructions.png").stat().st_size > 1000
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["loss/contrastive"] + r["loss/reconstruction"]) for r in rows)  # 1e-6
    assert rows[0]["weight_decay"] == 0.1 and rows[0]["momentum"] == 0.996  # the schema's: constant decay here
    state = checkpoint.load(Path(full["checkpoint"]))
    assert state["config"]["method"]["name"] == "sit" and "teacher_encoder.pos_embed" in state["model"]
    cut = [*tiny_overrides, *SIT, "run.name=sit-cut", "eval.knn_every_epochs=0"]
    assert train.main([*cut, "run.stop_at_step=4"])["steps"] == 4
    resumed = train.main(cut)
    assert losses(Path(resumed["run_dir"])) == losses(run_dir)  # bit for bit, corruption included


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_overrides, caplog):
    summary = train.main([*tiny_overrides, "run.stop_at_step=4", "run.ckpt_every=2"])
    run_dir = Path(summary["run_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    checkpoint.path_for(run_dir, 4).write_bytes(b"torn")
    resumed = train.main([*tiny_overrides, "run.ckpt_every=2"])  # resume=auto skips it with a warning
    assert resumed["steps"] == 6 and "ckpt-00000004.pt is damaged" in caplog.text
    assert "resumed from" in caplog.text and "ckpt-00000002.pt (step 2)" in caplog.text


def test_batch_must_divide_over_the_processes(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("data.batch_size")] + ["data.batch_size=7"]
    result = subprocess.run(
        [
            *TORCHRUN_2,
            str(REPO / "train.py"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=ENV_1_THREAD,
    )
    assert result.returncode != 0
    assert "data.batch_size=7 is the global batch and must divide evenly over 2 processes" in result.stderr


@pytest.mark.parametrize("uint8_views", [False, True])
def test_tiny_run_with_the_dali_backend(tiny_overrides, uint8_views):
    pytest.importorskip("nvidia.dali")
    summary = train.main([*tiny_overrides, "data.backend=dali", f"data.uint8_views={uint8_views}"])
    assert summary["steps"] == 6 and summary["knn_top1_pretrained"] >= 0
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(Path(summary["run_dir"])).values())
