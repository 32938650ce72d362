"""Command-line entry points end with one line on stderr and exit code 2 for problems the user can fix, and leave
the process group (if any) before the interpreter exits."""

from __future__ import annotations

import sys
from collections.abc import Callable

from fastvit_ssl import distributed
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import ConfigError
from fastvit_ssl.data.folder import DataError
from fastvit_ssl.guard import TrainingDiverged

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged)


def run(main: Callable[[], object]) -> None:
    """Call `main`; a user error prints `error: <what and how to fix it>` (no traceback) and exits with 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown(wait_for_others=False)  # a failed rank exits now, so the launcher sees the failure
        sys.exit(2)
    distributed.shutdown()
