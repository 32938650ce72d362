"""Run by tests/test_distributed.py under torchrun: SiT's reconstruction loss or BEiT's masked-token loss with
`loss_reduction=per_rank` and `global`, next to the official code's formula re-derived here (each rank's own mean,
then the mean over ranks that DDP's gradient averaging amounts to), in float64 on a fixed global batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/reduction_worker.py OUT.pt sit|beit
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from beit_overrides import BEIT_TINY

from fastvit_ssl import distributed
from fastvit_ssl.config import load
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.beit import IGNORE
from fastvit_ssl.methods.build import build_method

TINY = ["model.arch=vit_demo", "model.img_size=28"]  # 4 x 4 patches: ranks mask different counts
SIT = [*TINY, "method.name=sit", "sit.dim=16", "sit.mlp_dim=32", "sit.drop_path=0", "sit.replace_prob=0"]


def beit_overrides(folder: Path) -> list[str]:
    """BEiT without drop path on a seeded random tokenizer of 4 x 4 tokens (28 px views, patches of 7)."""
    from fastvit_ssl.tokenizer.dvae import PatchVQ, PatchVQConfig

    path = folder / "tokenizer.safetensors"
    if distributed.is_main():
        with torch.random.fork_rng():
            torch.manual_seed(7)
            PatchVQ(PatchVQConfig(image_size=28, patch=7, vocab=16)).save(path)
    distributed.barrier()
    masks = ["beit.mask_patches=6", "beit.mask_min_patches=2"]
    return [*BEIT_TINY, *masks, "beit.drop_path=0", f"beit.tokenizer_path={path}"]


def rank_losses(method: str, reduction: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, the official formula) on this rank's share of the global batch, each averaged over ranks."""
    overrides = SIT if method == "sit" else [*TINY, *beit_overrides(folder)]
    cfg = load(None, [*overrides, f"{method}.loss_reduction={reduction}"])
    torch.manual_seed(0)
    model = build_method(cfg, REFERENCE_OPS).double()
    views = torch.randn(2, 8, 3, cfg.model.img_size, cfg.model.img_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    n = 8 // distributed.world_size()
    shard = list(views[:, distributed.rank() * n : (distributed.rank() + 1) * n])
    batch = model.prepare(shard, step=0)
    outputs = model.online(*model.online_inputs(batch))
    losses = model.losses(outputs, model.targets(batch), batch)
    if method == "sit":  # main.py: F.l1_loss(s_recons, clean, reduction='none')[masks == 1].mean()
        ours = losses["loss/reconstruction"]
        errors = F.l1_loss(outputs[1], batch["clean"], reduction="none")
        official = errors[batch["mask"][:, None].expand_as(errors)].mean()
    else:  # engine_for_pretraining.py: nn.CrossEntropyLoss()(logits of the masked tokens, their labels)
        ours = losses["loss"]
        counted = batch["targets"] != IGNORE
        hidden = model.online.hidden(batch["images"], batch["mask"], batch["positions"])[counted]
        head = model.online.lm_head
        official = F.cross_entropy(F.linear(hidden, head.weight, head.bias), batch["targets"][counted])
    return distributed.all_reduce_mean(ours.detach()), distributed.all_reduce_mean(official.detach())


if __name__ == "__main__":
    out, method = Path(sys.argv[1]), sys.argv[2]
    distributed.init_from_env(torch.device("cpu"))
    results = {reduction: rank_losses(method, reduction, out.parent) for reduction in ("per_rank", "global")}
    if distributed.is_main():
        torch.save(results, out)
    distributed.shutdown()
