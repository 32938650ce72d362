"""Run by tests/test_deepspeed.py: a few MoCo v3 (and SiT, BEiT, MAE, DINO) steps on a fixed global batch with the
DeepSpeed engine under torchrun (gloo, CPU), or with the local engine in one process as the reference. Rank 0
saves, per experiment, the losses and the full fp32 weights of the trained network.

    python -m torch.distributed.run --nproc_per_node 2 tests/ds_worker.py OUT.pt deepspeed
    python tests/ds_worker.py OUT.pt local
"""

import sys
from pathlib import Path

import torch
from beit_overrides import BEIT_TINY

from fastvit_ssl import distributed
from fastvit_ssl.config import load
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.schedules import Hyperparameters

STEPS = 4
LR = {"adamw": 2e-3, "lars": 0.3, "lamb": 5e-3}
# LAMB's first step is Adam's: u = g / (|g| + eps) per element, a step of full size and random sign for a gradient
# that is zero up to rounding (|g| < ~1e-8, e.g. where softmax cancels). Two runs that round differently (2 ranks
# vs 1, any two CPUs) then differ by 2 lr |p|/|u| ~ 4e-4 per flipped element. With eps above rounding noise and
# below the typical gradient (median |g| is 2e-2 here), u is a smooth function of g and rounding stays rounding.
LAMB_EPS = "optim.eps=1e-3"
WEIGHT_DECAY = 0.1  # the schema's default
BASE = [
    "model.arch=vit_demo",
    "model.img_size=14",
    "moco.dim=16",
    "moco.mlp_dim=32",
    "data.batch_size=8",
    "model.frozen_patch_embed=false",
]
# SiT without its two per-rank random parts (drop path, the replacement's partner), so ranks can equal one process
SIT = ["method.name=sit", "sit.dim=16", "sit.mlp_dim=32", "sit.drop_path=0", "sit.replace_prob=0"]
# BEiT without drop path (per rank), on a fixed random tokenizer (tokenizer_path added by beit_tokenizer)
BEIT = [*BEIT_TINY, "beit.drop_path=0"]
MAE = ["method.name=mae", "model.pos_embed=sincos_cols_first", "mae.decoder_dim=16", "mae.decoder_depth=1"]
MAE += ["mae.decoder_heads=2"]
# DINO on its two global crops, without drop path (per rank)
DINO = ["method.name=dino", "model.pos_embed=learned", "dino.local_crops=0", "dino.drop_path=0", "dino.out_dim=64"]
DINO += ["dino.hidden_dim=32", "dino.bottleneck_dim=16"]


def beit_tokenizer(folder: Path) -> str:
    """A seeded random tokenizer for the 14 px views (2 x 2 tokens of 16), written by rank 0."""
    from fastvit_ssl.tokenizer.dvae import PatchVQ, PatchVQConfig

    path = folder / "tokenizer.safetensors"
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(7)
            PatchVQ(PatchVQConfig(image_size=14, patch=7, vocab=16)).save(path)
    distributed.barrier()
    return str(path)


def views(step: int) -> list[torch.Tensor]:
    """This rank's share of the global batch of step `step`: 8 fixed images, two noisy views each."""
    images = torch.randn(8, 3, 14, 14, generator=torch.Generator().manual_seed(100))
    noisy = images + 0.3 * torch.randn(2, 8, 3, 14, 14, generator=torch.Generator().manual_seed(step))
    n = 8 // distributed.world_size()
    return list(noisy[:, distributed.rank() * n : (distributed.rank() + 1) * n])


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The trained tensors, whole and in fp32 (gathered from ZeRO's partitions)."""
    trained = [(k, p) for k, p in engine.model.online.named_parameters() if p.requires_grad]
    if isinstance(engine, LocalEngine) or engine.stage == 0:
        return {k: p.detach().float().clone() for k, p in trained}
    from deepspeed.utils import safe_get_full_fp32_param

    return {k: safe_get_full_fp32_param(p).detach().clone() for k, p in trained}


def make_engine(kind: str, optimizer: str, stage: int, layout: bool = True, precision: str = "fp32", extra=()):
    overrides = [
        *extra,
        *([LAMB_EPS] if optimizer == "lamb" else []),
        f"optim.name={optimizer}",
        f"engine.name={kind}",
        f"engine.zero_stage={stage}",
        f"run.precision={precision}",
    ]
    cfg = load(None, [*BASE, *overrides])
    torch.manual_seed(0)
    model = build_method(cfg, REFERENCE_OPS)
    if kind == "local":
        return LocalEngine(model, build_optimizer(cfg.optim, model.param_groups()), torch.device("cpu")), cfg
    from fastvit_ssl.engine.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(model, cfg, torch.device("cpu"), REFERENCE_OPS)
    if not layout:  # what a plain LARS/LAMB does under ZeRO: one "tensor" per flat shard
        engine.optimizer.optimizer.zero_layout = None
    return engine, cfg


OWN = {"teacher_temp": 0.04, "last_layer": 1.0}  # the values the methods' own schedules take here (DINO's)


def hparams(optimizer: str) -> Hyperparameters:
    return Hyperparameters(LR[optimizer], WEIGHT_DECAY, momentum=0.99, values=OWN)


def train(engine, optimizer: str, steps=range(STEPS)) -> list[float]:
    return [engine.step(views(s), s, hparams(optimizer))[0]["loss"].item() for s in steps]


def first_step_layer_norms(engine, optimizer: str) -> dict[str, float]:
    metrics = engine.step(views(0), 0, hparams(optimizer))[0]
    return {k: v.item() for k, v in metrics.items() if k.startswith("grad/")}


def experiments(kind: str, tmp: Path) -> dict:
    results = {}
    runs = [("adamw", 0), ("adamw", 1), ("adamw", 2), ("adamw", 3), ("lars", 2), ("lamb", 2), ("lars", 3)]
    for optimizer, stage in runs if kind == "deepspeed" else [("lars", 0), ("lamb", 0), ("adamw", 0)]:
        engine, _ = make_engine(kind, optimizer, stage)
        results[f"{optimizer}-zero{stage}"] = {"losses": train(engine, optimizer), "weights": full_weights(engine)}
    for stage in [2, 3] if kind == "deepspeed" else [0]:  # two steps: SiT's tiny run turns chaotic after that
        engine, _ = make_engine(kind, "lars", stage, extra=SIT)
        results[f"sit-zero{stage}"] = {"losses": train(engine, "lars", range(2)), "weights": full_weights(engine)}
    beit = [*BEIT, f"beit.tokenizer_path={beit_tokenizer(tmp)}"]
    for stage in [2, 3] if kind == "deepspeed" else [0]:
        engine, _ = make_engine(kind, "lars", stage, extra=beit)  # LARS: AdamW magnifies rounding at step 1
        results[f"beit-zero{stage}"] = {"losses": train(engine, "lars", range(2)), "weights": full_weights(engine)}
    for stage in [2, 3] if kind == "deepspeed" else [0]:
        engine, _ = make_engine(kind, "lars", stage, extra=MAE)
        results[f"mae-zero{stage}"] = {"losses": train(engine, "lars", range(2)), "weights": full_weights(engine)}
    for stage in [2, 3] if kind == "deepspeed" else [0]:
        engine, _ = make_engine(kind, "lars", stage, extra=DINO)
        results[f"dino-zero{stage}"] = {"losses": train(engine, "lars", range(2)), "weights": full_weights(engine)}
    for stage in [2, 3] if kind == "deepspeed" else []:  # compiled blocks, to compare with lars-zero2/3
        engine, _ = make_engine(kind, "lars", stage, extra=["model.compile=true"])
        results[f"lars-zero{stage}-compiled"] = {
            "losses": train(engine, "lars"),
            "weights": full_weights(engine),
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        }
    for stage in [0, 2, 3] if kind == "deepspeed" else [0]:  # stage 1 reads its gradients as stage 2 does
        engine, _ = make_engine(kind, "lars", stage)
        results[f"layer-norms-zero{stage}"] = first_step_layer_norms(engine, "lars")
    if kind == "deepspeed":
        engine, _ = make_engine(kind, "lars", 2, layout=False)
        results["lars-zero2-per-shard"] = {"losses": train(engine, "lars"), "weights": full_weights(engine)}
        engine, cfg = make_engine(kind, "lars", 2)  # save after 2 steps, load into a fresh engine, continue
        first = train(engine, "lars", range(2))
        path = engine.save(tmp, 2, {"step": 2, "config": cfg.to_dict(), "rng": {}}, keep_last=2)
        resumed, _ = make_engine(kind, "lars", 2)
        resumed.load(path, cfg.to_dict())
        results["lars-zero2-resumed"] = {
            "losses": first + train(resumed, "lars", range(2, STEPS)),
            "weights": full_weights(resumed),
        }
        results["adamw-zero2-bf16-nan-gradient"] = nan_gradient_step(make_engine(kind, "adamw", 2, precision="bf16")[0])
    return results


def nan_gradient_step(engine) -> dict:
    """Two bf16 steps, then one whose loss is finite but one weight's gradient is NaN, then a normal step."""
    first = train(engine, "adamw", range(2))
    before = full_weights(engine)
    weight = engine.model.online.base_encoder.blocks[0].mlp.fc1.weight
    buffers = [b.clone() for b in engine.model.buffers()]
    hook = weight.register_hook(lambda grad: grad * float("nan"))
    metrics, finite = engine.step(views(2), 2, hparams("adamw"))
    hook.remove()
    changed = max((full_weights(engine)[k] - before[k]).abs().max().item() for k in before)
    changed = max([changed] + [(b - a).abs().max().item() for a, b in zip(buffers, engine.model.buffers())])
    return {
        "losses": first + [metrics["loss"].item()] + train(engine, "adamw", range(3, 4)),
        "finite": finite,
        "grad_norm": metrics["grad_norm"].item(),
        "changed": changed,
    }


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    distributed.init_from_env(torch.device("cpu"))
    results = experiments(kind, out.parent / f"checkpoints-{kind}")
    if distributed.is_main():
        torch.save(results, out)
    distributed.shutdown()
