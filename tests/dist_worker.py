"""Run by tests/test_distributed.py under torchrun: one MoCo v3 step on this rank's share of a fixed global batch,
saving the loss and the gradients so the test can compare them with a single-process run."""

import sys

import torch

from fastvit_ssl import distributed
from fastvit_ssl.config import load
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.methods.mocov3 import build_mocov3


def one_step(out_path: str) -> None:
    cfg = load(None, ["model.arch=vit_demo", "model.img_size=14", "moco.dim=16", "moco.mlp_dim=32"])
    torch.manual_seed(0)
    model = build_mocov3(cfg)
    x1, x2 = torch.randn(2, 8, 3, 14, 14, generator=torch.Generator().manual_seed(1))  # the global batch
    n = 8 // distributed.world_size()
    shard = slice(distributed.rank() * n, (distributed.rank() + 1) * n)
    engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"))
    loss = engine.forward_module(x1[shard], x2[shard], 0.99)
    loss.backward()
    loss = distributed.all_reduce_mean(loss.detach())  # the global-batch loss is the mean over ranks
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if distributed.is_main():
        torch.save({"loss": loss, "grads": grads}, out_path)


if __name__ == "__main__":
    distributed.init_from_env(torch.device("cpu"))
    one_step(sys.argv[1])
    distributed.shutdown()
