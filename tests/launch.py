"""How the tests start several processes: torchrun or the deepspeed launcher with two local ranks on a free port,
one thread each."""

import os
import socket
import sys

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV_1_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher_2() -> list[str]:
    """`deepspeed --num_gpus 2` as users run it (it passes --local_rank to the script), on a free port."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
