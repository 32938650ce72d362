"""Command-line entry points end with one line on stderr and exit code 2 for problems the user can fix, or exit code
3 (`preemption.RESUMABLE_EXIT`) when a signal or the wall-clock budget stopped a run after a checkpoint; either way
they leave the process group (if any) before the interpreter exits. A rank whose peers are gone exits at once with one
line and code 4 (`preemption.PEERS_LOST_EXIT`): it can neither save nor leave the group. Ctrl-C outside the training
steps (where nothing can be saved) is one line and code 130. Under a launcher, rank 0
prints a config error (every rank has the same; the others wait for rank 0 to print it and exit, after which the
launcher stops them); other errors are printed by the rank that met them."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from fastvit_ssl import distributed
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import ConfigError
from fastvit_ssl.data.folder import DataError
from fastvit_ssl.guard import TrainingDiverged
from fastvit_ssl.preemption import EarlyStop, PeersLost, abandon

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged)
INTERRUPTED = (
    "interrupted (Ctrl-C) where nothing is saved (outside the training steps); rerun the same command: training "
    "continues from the newest checkpoint in its run folder"
)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports it
CONFIG_ERROR_GRACE_S = 30  # how long a rank other than 0 waits with a config error for rank 0 to report it


def run(main: Callable[[], object]) -> None:
    """Call `main`; a user error prints `error: <what and how to fix it>` (no traceback) and exits with 2."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        main()
    except EarlyStop as e:
        if rank == 0:
            print(str(e), file=sys.stderr, flush=True)
        distributed.shutdown()
        sys.exit(e.exit_code)
    except PeersLost as e:
        abandon(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (set-up, a tokenizer, the final evaluation)
        if rank == 0:
            print(INTERRUPTED, file=sys.stderr, flush=True)
        distributed.shutdown(wait_for_others=False)
        sys.exit(INTERRUPTED_EXIT)
    except USER_ERRORS as e:
        if rank == 0 or not isinstance(e, ConfigError):
            where = f" (rank {rank})" if rank else ""
            print(f"error{where}: {e}", file=sys.stderr, flush=True)
        else:  # exiting first would have the launcher stop rank 0 before it prints
            time.sleep(CONFIG_ERROR_GRACE_S)
        distributed.shutdown(wait_for_others=False)  # a failed rank exits now, so the launcher sees the failure
        sys.exit(2)
    distributed.shutdown()
