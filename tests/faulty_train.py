"""train.py with the faults of the environment installed (tests/faults.py): what the reliability tests launch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py
import faults  # noqa: E402

import train  # noqa: E402
from fastvit_ssl import cli  # noqa: E402

if __name__ == "__main__":
    faults.install_from_env()
    cli.run(train.main)
