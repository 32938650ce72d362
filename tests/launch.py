"""How the tests start several processes: torchrun with two local ranks on a free port, one thread each."""

import os
import sys

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV_1_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
