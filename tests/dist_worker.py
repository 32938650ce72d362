"""Run by tests/test_distributed.py under torchrun: one step of a method (MoCo v3, SiT, MAE, DINO) on this rank's share
of a fixed global batch (a method with one view takes the first), saving the loss and the gradients so the test can
compare them with a single-process run. In float64: what is compared is the math of splitting the batch, not the
rounding of fp32 sums taken in another order.

    python tests/dist_worker.py OUT.pt METHOD [override ...]
"""

import sys

import torch

from fastvit_ssl import distributed
from fastvit_ssl.config import load
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.optim.schedules import Hyperparameters


def one_step(out_path: str, overrides: list[str]) -> None:
    cfg = load(None, ["model.arch=vit_demo", "model.img_size=14", "moco.dim=16", "moco.mlp_dim=32", *overrides])
    torch.manual_seed(0)
    model = build_method(cfg, REFERENCE_OPS).double()
    x1, x2 = torch.randn(2, 8, 3, 14, 14, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = 8 // distributed.world_size()
    shard = slice(distributed.rank() * n, (distributed.rank() + 1) * n)
    engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"))
    loss = model.step_losses(
        [x1[shard], x2[shard]],
        step=0,
        hparams=Hyperparameters(0.0, 0.0, 0.99, {"teacher_temp": 0.04}),
        online=engine.online,
    )["loss"]
    loss.backward()
    loss = distributed.all_reduce_mean(loss.detach())  # the global-batch loss is the mean over ranks
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b for name, b in model.named_buffers() if name == "center"}  # DINO's: over the global batch
    if distributed.is_main():
        torch.save({"loss": loss, "grads": grads, "buffers": buffers}, out_path)


if __name__ == "__main__":
    distributed.init_from_env(torch.device("cpu"))
    one_step(sys.argv[1], sys.argv[2:])
    distributed.shutdown()
