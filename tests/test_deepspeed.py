"""The DeepSpeed engine on CPU with gloo, two processes (tests/ds_worker.py), against the local engine in one
process on the same global batch. The first run of a fresh environment JIT-builds DeepSpeed's shared-memory op
(about 40 s); TORCH_EXTENSIONS_DIR keeps it for the rest of the session.

The bounds: 2 ranks sum the gradients of 2 x 4 samples where one process sums 8, and other CPUs take other vector
paths, so the runs differ by fp32 rounding, a few ulps per op. The comparisons use LARS (LAMB with a large eps):
its step is a smooth function of the gradient, so after a few steps the weights (largest 1.5, one ulp 1.2e-7)
stay within tens of ulps of each other: < 1e-5 (~80 ulps). A layout bug moves them by > 1 (the control below).
Adam-type steps with a small eps are sign(g) for gradients that are zero up to rounding and would compare noise.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import ENV_1_THREAD, TORCHRUN_2, deepspeed_launcher_2

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("ds_worker.py")
ENV = {
    **ENV_1_THREAD,
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions")),
}


def run(tmp: Path, kind: str) -> dict:
    out = tmp / f"{kind}.pt"
    cmd = [*(TORCHRUN_2 if kind == "deepspeed" else [sys.executable]), str(WORKER), str(out), kind]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    return run(tmp, "deepspeed"), run(tmp, "local")


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_with_finite_decreasing_loss(results, stage):
    losses = results[0][f"adamw-zero{stage}"]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3  # measured: 2.46 -> 1.11


@pytest.mark.parametrize("stage", [2, 3])
def test_beit_under_zero_follows_the_single_process_run(results, stage):
    """BEiT's masks are drawn per image of the global batch, so 2 ranks train as 1 process (2 LARS steps)."""
    ours, reference = results[0][f"beit-zero{stage}"], results[1]["beit-zero0"]
    assert all(torch.isfinite(torch.tensor(ours["losses"])))
    assert max_diff(ours["weights"], reference["weights"]) < 1e-5  # measured: 1.2e-7


@pytest.mark.parametrize("method", ["mae", "dino"])
@pytest.mark.parametrize("stage", [2, 3])
def test_mae_and_dino_under_zero_follow_the_single_process_run(results, stage, method):
    """MAE's masks are drawn per image of the global batch and DINO's centre moves by the global batch's mean, so 2
    ranks train as 1 process (2 LARS steps; DINO's frozen last layer: lr 0 under DeepSpeed, no gradient locally)."""
    ours, reference = results[0][f"{method}-zero{stage}"], results[1][f"{method}-zero0"]
    assert all(torch.isfinite(torch.tensor(ours["losses"])))
    assert max_diff(ours["weights"], reference["weights"]) < 1e-5  # the module docstring's ~80 ulps


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_blocks_under_zero_train_as_eager(results, stage):
    """4 LARS steps. Inductor's fused loops compute erf, rsqrt and reductions with other instructions and in
    another order than eager (and differently on AVX2 and AVX-512): the first loss already differs by 5 ulps
    (5.8e-7), and every step adds such differences in forward and backward. Bounds of ~400 ulps (5e-5) for the
    losses and the weights; a wrong block (a lost residual, a dropped bias) moves the loss by > 1e-2. With AdamW
    (sign-like first steps, see the module docstring) the same runs were 2.5e-4 apart on one CPU, 1e-5 on another."""
    compiled, eager = results[0][f"lars-zero{stage}-compiled"], results[0][f"lars-zero{stage}"]
    assert compiled["graphs"] > 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=5e-5)  # measured: 3.7e-6
    assert max_diff(compiled["weights"], eager["weights"]) < 5e-5  # measured: 3.3e-6


@pytest.mark.parametrize("run_name", ["lars-zero2", "lars-zero3"])
def test_zero_partitioned_lars_matches_the_single_process_reference(results, run_name):
    ours, reference = results[0][run_name]["weights"], results[1]["lars-zero0"]["weights"]
    assert max_diff(ours, reference) < 1e-5  # measured: 9.5e-7 after 4 steps


@pytest.mark.parametrize("stage", [2, 3])
def test_sit_under_zero_follows_the_single_process_run(results, stage):
    """The weights after 2 LARS steps (the losses are rank 0's share, not comparable with one process's). Later
    steps of this tiny run take gradient norms of hundreds, which turn rounding differences into chaos."""
    ours, reference = results[0][f"sit-zero{stage}"], results[1]["sit-zero0"]
    assert all(torch.isfinite(torch.tensor(ours["losses"])))
    assert max_diff(ours["weights"], reference["weights"]) < 1e-5  # measured: 4.6e-7 (ZeRO-2), 5.0e-7 (ZeRO-3)


def test_zero_partitioned_lamb_matches_the_single_process_reference(results):
    """LAMB with eps=1e-3 (see ds_worker.LAMB_EPS: with eps=1e-8 its first step is sign(g) per element, and an
    element whose gradient is zero up to rounding flips between two runs by 2 lr |p|/|u| = 4.6e-4 here: the 4e-4
    once measured after the position table changed, 9e-6 on another CPU), so what is compared is the trust ratio
    over whole tensors; over shards instead they differ by > 1 (the LARS control below)."""
    ours, reference = results[0]["lamb-zero2"]["weights"], results[1]["lamb-zero0"]["weights"]
    assert max_diff(ours, reference) < 1e-5  # measured: 1.0e-6 after 4 steps, vectors included


def test_per_shard_trust_ratios_would_be_wrong(results):
    """The control: the same LARS without the ZeRO layout computes ratios over whole shards."""
    naive, reference = results[0]["lars-zero2-per-shard"]["weights"], results[1]["lars-zero0"]["weights"]
    assert max_diff(naive, reference) > 1.0


def test_a_non_finite_gradient_in_bf16_changes_nothing_and_is_reported(results):
    """The loss is finite, one weight's gradient is NaN: ZeRO skips the update, the engine tells the NaN guard."""
    run = results[0]["adamw-zero2-bf16-nan-gradient"]
    assert run["finite"] is False and not math.isfinite(run["grad_norm"])
    assert run["changed"] == 0.0  # no weight moved, not even those with finite gradients; BN statistics restored
    assert all(math.isfinite(loss) for loss in run["losses"])  # and the next step trains normally


def test_save_load_continue_equals_uninterrupted(results):
    resumed, uninterrupted = results[0]["lars-zero2-resumed"], results[0]["lars-zero2"]
    assert resumed["losses"] == uninterrupted["losses"]
    assert max_diff(resumed["weights"], uninterrupted["weights"]) == 0.0


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_per_layer_gradient_norms_are_the_local_engines(results, stage):
    """Read from ZeRO's partitions on two ranks: the same layers and norms as one process computes (first step,
    same weights and batch)."""
    ours, reference = results[0][f"layer-norms-zero{stage}"], results[1]["layer-norms-zero0"]
    assert sorted(ours) == sorted(reference) and "grad/block00" in ours and "grad/patch_embed" in ours
    for key, value in reference.items():  # norms of fp32 sums in another order: measured 8e-7 apart
        assert ours[key] == pytest.approx(value, rel=1e-4), key


def test_deepspeed_config_is_generated_from_ours():
    from fastvit_ssl.config import load
    from fastvit_ssl.engine.deepspeed_engine import to_deepspeed

    cfg = load(None, ["engine.name=deepspeed", "engine.zero_stage=3", "run.precision=bf16", "data.batch_size=4096"])
    ds = to_deepspeed(cfg, world_size=64)
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0 and ds["gradient_accumulation_steps"] == 1
    fp16 = to_deepspeed(load(None, ["engine.name=deepspeed", "run.precision=fp16"]), world_size=8)["fp16"]
    # dynamic loss scaling as torch's GradScaler: 2^16, halved at every overflow, doubled after 2,000 clean steps
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 2000,
        "hysteresis": 1,
        "min_loss_scale": 1,
    }


def test_fp16_under_deepspeed_on_a_cpu_is_a_config_error():
    """DeepSpeed's CPU accelerator has no fp16: one line before anything is built (the GPU suite runs it)."""
    from fastvit_ssl.config import ConfigError, load
    from fastvit_ssl.engine.build import check_engine

    with pytest.raises(ConfigError, match="needs a GPU"):
        check_engine(load(None, ["engine.name=deepspeed", "run.precision=fp16"]), torch.device("cpu"))


def test_deepspeed_launcher_trains_resumes_and_consolidates(tiny_overrides, tmp_path):
    """The user's path: `deepspeed train.py` with engine.name=deepspeed in bf16 on uint8 views (the ViT-L/H
    recipe), interrupted, resumed, then consolidated for eval."""
    from fastvit_ssl.config import from_dict
    from fastvit_ssl.engine.consolidate import main as consolidate
    from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
    from fastvit_ssl.methods.mocov3 import MoCoV3

    repo = Path(__file__).resolve().parents[1]
    command = [
        str(repo / "train.py"),
        *tiny_overrides,
        "engine.name=deepspeed",
        "engine.zero_stage=2",
        "run.precision=bf16",
        "data.uint8_views=true",
        "optim.name=lars",
        "eval.knn_every_epochs=0",
    ]
    for extra in (["run.stop_at_step=4"], []):
        launch = [*deepspeed_launcher_2(), *command, *extra]  # a fresh port each time
        result = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "(step 4)" in result.stdout
    assert "kNN top-1: random-init" in result.stdout
    run_dir = tmp_path / "runs" / "tiny"
    assert consolidate([str(run_dir), "--out", str(tmp_path / "model.pt")]) == 0
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["step"] == 6
    MoCoV3.build(from_dict(state["config"]), REFERENCE_OPS).load_state_dict(state["model"])  # strict: every key present


def test_deepspeed_runs_without_a_launcher(tiny_overrides):
    """`python train.py engine.name=deepspeed`: a process group of one, instead of DeepSpeed's MPI discovery."""
    cmd = [sys.executable, "train.py", *tiny_overrides, "engine.name=deepspeed", "run.stop_at_step=1"]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed/step00000001" in result.stdout


def test_a_zero3_run_evaluates_draws_and_exports_at_its_end(tiny_overrides, tmp_path):
    """Under ZeRO-3 the parameters are partitioned: the kNN checks (each epoch and at the end) and the pictures run
    on rank 0 with every rank lending its partitions (they waited for engine.timeout_s before); the run folder then
    exports (consolidated on the fly) to the encoder rank 0 evaluated."""
    import json

    from fastvit_ssl.eval import export

    zero3 = ["engine.name=deepspeed", "engine.zero_stage=3", "eval.knn_every_epochs=1"]
    cmd = [*TORCHRUN_2, str(Path(__file__).resolve().parents[1] / "train.py"), *tiny_overrides, *zero3]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())  # tiny_overrides' run folder
    assert summary["knn_top1_pretrained"] > 0 and all(Path(p).stat().st_size > 1000 for p in summary["pictures"])
    assert export.main(["--checkpoint", summary["run_dir"], "--out", str(tmp_path / "encoder.safetensors")]) == 0
