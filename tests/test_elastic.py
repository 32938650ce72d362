"""Cluster runs that lose a worker (issue 28), with real launchers, real processes and SIGKILL or SIGSTOP
(tests/faults.py): under `torchrun --max-restarts 2` (static and c10d rendezvous, one agent or two) the group restarted
after a worker is killed forms again, resumes from the newest checkpoint and finishes with the per-step losses of an
uninterrupted run, bit for bit; without restarts the survivor ends at once with one line and the newest complete
checkpoint intact; a survivor whose peer stops answering (a lost node) ends within the stop grace after SIGTERM; two
agents on one machine (two "nodes") train as one job.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvit_ssl import checkpoint
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.preemption import GRACE_S, PEERS_LOST_EXIT
from launch import ENV_1_THREAD, free_port

REPO = Path(__file__).resolve().parents[1]
FAULTY_TRAIN = REPO / "tests" / "faulty_train.py"  # train.py with the faults of the environment
STEPS = ["optim.epochs=4"]  # 12 steps of batch 8, a checkpoint after every 3rd
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--monitor-interval", "0.1"]
LOST_PEER = "a collective failed, another rank is gone"


def agents(form: str, restarts: int) -> list[list[str]]:
    """The torchrun commands (one per agent, i.e. per "node") of a 2-rank job on this machine."""
    port, nodes = free_port(), 2 if form.endswith("-2-agents") else 1
    common = [*TORCHRUN, "--nnodes", str(nodes), "--nproc_per_node", str(2 // nodes), "--max-restarts", str(restarts)]
    if form.startswith("c10d"):  # what the launcher recommends for several nodes: ranks assigned at each round
        c10d = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}"]
        return [[*common, *c10d]] * nodes
    static = [*common, "--master_addr", "127.0.0.1", "--master_port", str(port)]  # the default: fixed node ranks
    return [[*static, "--node_rank", str(node)] for node in range(nodes)]


def launch(form: str, overrides: list[str], cwd: Path, restarts: int = 0, kill_at: str = "") -> tuple[int, str, str]:
    """Run the job to its end: (the first agent's exit code, stdout and stderr of all agents)."""
    env = {**ENV_1_THREAD, "FAULT_KILL_AT": kill_at}
    procs = [
        subprocess.Popen(
            [*agent, str(FAULTY_TRAIN), *overrides],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for agent in agents(form, restarts)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    return procs[0].returncode, "".join(o for o, _ in outputs), "".join(e for _, e in outputs)


def rows(run_dir: Path) -> dict[int, dict]:
    """step -> its metrics row; a step recorded twice fails."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len({r["step"] for r in steps}) == len(steps), "a step recorded twice"
    return {r["step"]: r for r in steps}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in rows(run_dir).items()}


def assert_checkpoints_complete(run_dir: Path) -> list[str]:
    """Every checkpoint file has its checksum and no temporary file is left; returns the names, oldest first."""
    names = sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
    assert names == [p.name for p in checkpoint.list_checkpoints(run_dir)], names
    assert not list(run_dir.glob(".*.tmp"))
    return names


@pytest.fixture(scope="module")
def train_only(dataset_root, tmp_path_factory) -> Path:
    """The test images without val/: no kNN evaluation at the end of each run (seconds each on 2 cores)."""
    root = tmp_path_factory.mktemp("train_only")
    (root / "train").symlink_to(dataset_root / "train")
    return root


@pytest.fixture
def overrides(tiny_overrides, train_only) -> list[str]:
    return [*tiny_overrides, f"data.root={train_only}", *STEPS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run folder of an uninterrupted 2-rank run (torchrun, one agent) with the given overrides (their
    run.out_dir aside), run once for the module."""
    done = {}

    def run_dir(overrides: list[str]) -> Path:
        key = tuple(o for o in overrides if not o.startswith("run.out_dir="))
        if key not in done:
            cwd = tmp_path_factory.mktemp("uninterrupted")
            code, _, stderr = launch("c10d", [*key, f"run.out_dir={cwd / 'runs'}"], cwd)
            assert code == 0, stderr[-3000:]
            done[key] = cwd / "runs" / "tiny"
        return done[key]

    return run_dir


@pytest.mark.parametrize("form", ["static", "c10d", "c10d-2-agents"])
def test_a_killed_worker_is_restarted_and_finishes_as_if_uninterrupted(form, overrides, tmp_path, uninterrupted):
    code, stdout, stderr = launch(form, overrides, tmp_path, restarts=2, kill_at="1:5")
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert stderr.count("fault: SIGKILL to itself at step 5") == 1  # killed in the first attempt only
    run_dir = tmp_path / "runs" / "tiny"
    starts = [json.loads(line)["step"] for line in (run_dir / "run_info.jsonl").read_text().splitlines()]
    assert starts == [0, 3]  # restarted once, from the checkpoint of step 3
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    reference = uninterrupted(overrides)
    assert losses(run_dir) == losses(reference)  # exact resume: bit for bit
    assert assert_checkpoints_complete(run_dir) == assert_checkpoints_complete(reference)
    assert assert_checkpoints_complete(run_dir) == ["ckpt-00000006.pt", "ckpt-00000009.pt", "ckpt-00000012.pt"]


def test_without_restarts_the_survivor_ends_at_once_with_one_line(overrides, tmp_path):
    """torchrun --max-restarts 0: rank 1 is killed at step 5, the agent sends SIGTERM to rank 0. Rank 0 must not
    try to save through collectives that cannot complete: it exits with one line, and the checkpoint of step 3 (the
    newest complete one) stays as it was."""
    code, _, stderr = launch("c10d", overrides, tmp_path, kill_at="1:5")
    ended = time.time()
    killed = float(re.search(r"fault: SIGKILL to itself at step 5, time ([\d.]+)", stderr).group(1))
    assert code != 0 and f"exitcode  : {PEERS_LOST_EXIT}" in stderr, stderr[-3000:]
    reasons = [line for line in stderr.splitlines() if line.startswith("error (rank 0): ")]
    assert len(reasons) == 1 and LOST_PEER in reasons[0], stderr[-3000:]
    assert "rerun the same command to continue" in reasons[0]
    assert "[rank0]: Traceback" not in stderr  # no uncaught error in the worker (torchrun's own report follows)
    # measured: 0.6-0.8 s from the kill to torchrun's exit (gloo reports the closed sockets at once, the agent polls
    # every 0.1 s); the bound leaves room for a loaded machine and is far below engine.timeout_s (600 s)
    assert ended - killed < 10, ended - killed
    run_dir = tmp_path / "runs" / "tiny"
    assert assert_checkpoints_complete(run_dir) == ["ckpt-00000003.pt"]
    assert checkpoint.load(run_dir / "ckpt-00000003.pt")["step"] == 3  # its checksum verified


def test_a_survivor_whose_peer_stopped_answering_ends_after_sigterm_within_the_grace(overrides, tmp_path):
    """A lost node closes no socket: rank 1 stops (SIGSTOP) at step 5, so rank 0 waits in a collective that only
    engine.timeout_s would end, where no Python signal handler runs. SIGTERM (as Slurm sends when it gives up the
    job) must end it within the stop grace, with one line and the newest checkpoint intact. Started as `srun` starts
    ranks: plain processes with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, rank 0 serving the store."""
    env = {**ENV_1_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["FAULT_SIGNAL_AT"] = "1:5:SIGSTOP"
    cmd = [sys.executable, str(FAULTY_TRAIN), *overrides]
    ranks = [
        subprocess.Popen(cmd, cwd=tmp_path, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
        for r in (0, 1)
    ]
    try:
        run_dir = tmp_path / "runs" / "tiny"
        deadline = time.monotonic() + 120
        while 4 not in (rows(run_dir) if run_dir.is_dir() else {}) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # rank 0 is in step 5, waiting for rank 1
        sent = time.monotonic()
        ranks[0].send_signal(signal.SIGTERM)
        _, stderr = ranks[0].communicate(timeout=GRACE_S + 60)
        took = time.monotonic() - sent
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    stderr = stderr.decode()
    assert ranks[0].returncode == PEERS_LOST_EXIT, stderr[-3000:]
    reasons = [line for line in stderr.splitlines() if line.startswith("error (rank 0): ")]
    assert len(reasons) == 1 and "SIGTERM received, but the ranks did not agree to stop within" in reasons[0]
    assert GRACE_S <= took < GRACE_S + 5, took  # measured: 10.1 s (GRACE_S = 10: the steps here are short)
    assert assert_checkpoints_complete(run_dir) == ["ckpt-00000003.pt"]
    assert checkpoint.load(run_dir / "ckpt-00000003.pt")["step"] == 3


def test_two_agents_on_one_machine_train_as_one_job(overrides, tmp_path, uninterrupted):
    """`torchrun --nnodes 2 --node_rank {0,1} --master_addr ...` as on two nodes: the same 2-rank job as one agent
    with two workers (bit for bit), and the global batch's gradient of one process. The logged loss is rank 0's
    share of the batch (its queries against all keys), so one process's loss differs by construction; the gradient
    norms are taken after DDP's average, over the global batch."""
    code, _, stderr = launch("static-2-agents", overrides, tmp_path)
    assert code == 0, stderr[-3000:]
    two_nodes = rows(tmp_path / "runs" / "tiny")
    assert losses(tmp_path / "runs" / "tiny") == losses(uninterrupted(overrides))
    alone = [sys.executable, str(REPO / "train.py"), *overrides, "run.name=one-process"]
    subprocess.run(alone, cwd=tmp_path, env=ENV_1_THREAD, capture_output=True, timeout=300, check=True)
    one = rows(tmp_path / "runs" / "one-process")
    # Step 1, before any update: the same weights and images, sums of 8 samples against 2 x 4 in fp32 (unit
    # roundoff 6e-8). Measured: at most 2.7e-7 relative over the 8 norms. 1e-4 leaves ~400x for other CPUs' vector
    # paths and is far below a wrong split (a node training on its own half, or on the whole batch twice): another
    # batch is another gradient (rank 0's half-batch loss differs from the whole batch's by 2-17% per step here).
    norms = [k for k in one[1] if k == "grad_norm" or k.startswith("grad/")]
    assert len(norms) > 3
    for key in norms:
        torch.testing.assert_close(two_nodes[1][key], one[1][key], rtol=1e-4, atol=0, msg=key)
    assert len(two_nodes) == 12
