"""Two gloo processes on a global batch must give one process's loss and gradients on the same batch: keys are
gathered from all ranks, labels are offset by N * rank, the heads' BN statistics cover the global batch, and SiT's
corruption (and MAE's mask) of an image does not depend on the number of ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import ENV_1_THREAD, TORCHRUN_2

WORKER = Path(__file__).with_name("dist_worker.py")
# SiT: no drop path (random per rank) and no replacement (its partner comes from the rank's own images)
METHODS = {
    "mocov3": [],
    "sit": ["method.name=sit", "sit.dim=16", "sit.mlp_dim=32", "sit.drop_path=0", "sit.replace_prob=0"],
    # MAE: each image's mask comes from the global batch's noise; every image removes 3 of its 4 patches
    "mae": ["method.name=mae", "model.pos_embed=sincos_cols_first", "model.frozen_patch_embed=false"]
    + ["mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"],
    # DINO: its two global crops, no drop path (random per rank); the centre moves by the global batch's mean
    "dino": ["method.name=dino", "model.pos_embed=learned", "model.init=trunc_normal", "dino.local_crops=0"]
    + ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.drop_path=0"],
}


def run_worker(nproc: int, out: Path, overrides: list[str]) -> dict:
    cmd = [*(TORCHRUN_2 if nproc == 2 else [sys.executable]), str(WORKER), str(out), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV_1_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process(tmp_path, method):
    one = run_worker(1, tmp_path / "one.pt", METHODS[method])
    two = run_worker(2, tmp_path / "two.pt", METHODS[method])
    # In float64 (unit roundoff 1.1e-16) sums of 8 samples against 2 x 4 differ by rounding, amplified by the
    # network's cancellations to ~30 roundoffs of the largest gradient (3.7e-15). 1e-12 leaves a margin of ~300
    # for other CPUs' vector paths and is 12 orders below a wrong split (a label offset, BN statistics of one
    # rank, a mask drawn per rank), which changes the gradients by O(1).
    assert two["loss"].dtype == torch.float64
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-12, atol=0)  # measured: 1.9e-16 relative
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 50
    scale = max(g.abs().max() for g in one["grads"].values())
    for name, grad in one["grads"].items():  # measured: 2.7e-15 (MoCo), 3.7e-15 (SiT)
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=1e-12 * scale, msg=name)
    for name, buffer in one["buffers"].items():  # a sum of 8 against 2 x 4 in float64
        torch.testing.assert_close(two["buffers"][name], buffer, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("method", ["sit", "beit"])
def test_per_rank_loss_reduction_is_the_official_formula(tmp_path, method):
    """On 2 ranks, `loss_reduction=per_rank` equals the official code's per-rank mean averaged over ranks; the
    default, `global`, is the mean over the global batch, which differs when the ranks mask different counts (SiT's
    corruption covers 3,256 and 3,198 pixels here; BEiT's block masking reaches its count in every image, so its two
    reductions agree)."""
    cmd = [*TORCHRUN_2, str(WORKER.with_name("reduction_worker.py")), str(tmp_path / "out.pt"), method]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV_1_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = torch.load(tmp_path / "out.pt", weights_only=True)
    ours, official = runs["per_rank"]
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)  # float64: the same sums in another order
    global_mean, official_again = runs["global"]
    torch.testing.assert_close(official_again, official, rtol=0, atol=0)  # the same batch and masks
    if method == "sit":
        assert abs(global_mean - official) > 1e-6, (global_mean, official)  # measured: 2.3e-5 (0.80508 vs 0.80505)
    else:
        torch.testing.assert_close(global_mean, official, rtol=1e-12, atol=0)
