"""Turn a DeepSpeed ZeRO checkpoint (any stage) into one fp32 checkpoint in the local engine's format, which
evaluation and export read like any other.

    python -m fastvit_ssl.engine.consolidate runs/vit_large            # the newest checkpoint of the run
    python -m fastvit_ssl.engine.consolidate runs/vit_large/deepspeed/step00012000 --out vit_large.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastvit_ssl import checkpoint
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import from_dict
from fastvit_ssl.engine.deepspeed_engine import META
from fastvit_ssl.methods.build import method_class


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or the newest complete one of a run folder."""
    if (path / META).is_file():
        return path
    found = sorted(p for p in (path / "deepspeed").glob("step*") if (p / META).is_file())
    if not found:
        raise CheckpointError(f"no complete DeepSpeed checkpoint in {path} (looked for deepspeed/step*/{META})")
    return found[-1]


def consolidate(folder: Path, out: Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = json.loads((folder / META).read_text())
    trained = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)  # gathers the shards
    states = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    momentum = torch.load(states[0], map_location="cpu", weights_only=True)["momentum"]
    model = {f"online.{k}": v for k, v in trained.items()} | momentum
    # Frozen tensors (random patch projection, sin-cos table) are not in the optimizer's shards; the EMA copies of
    # the trained modules hold identical copies of them.
    copies = method_class(from_dict(meta["config"]).method.name).ema_modules
    for trained_name, copy_name in copies.items():
        for key, value in momentum.items():
            if key.startswith(copy_name + "."):
                model.setdefault(trained_name + key.removeprefix(copy_name), value.clone())
    return checkpoint.save(out, {"step": meta["step"], "config": meta["config"], "model": model})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder or one deepspeed/stepNNNNNNNN folder")
    parser.add_argument("--out", type=Path, help="default: <run folder>/consolidated-stepNNNNNNNN.pt")
    args = parser.parse_args(argv)
    try:
        folder = find_checkpoint(args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or folder.parent.parent / f"consolidated-{folder.name}.pt"
    print(f"wrote {consolidate(folder, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
