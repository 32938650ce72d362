"""Self-supervised pre-training of a Vision Transformer: MoCo v3 (method.name=mocov3, the default), SiT, BEiT, MAE or
DINO (fastvit_ssl/methods/, one file each).

    python train.py                                       # the CPU demo: real handwritten digits, kNN at the end
    python train.py --config configs/sit_demo.yaml        # the same with SiT
    python train.py --config configs/beit_demo.yaml       # ... with BEiT (a small tokenizer trained first)
    python train.py --config configs/mae_demo.yaml        # ... with MAE
    python train.py --config configs/dino_demo.yaml       # ... with DINO
    python train.py --config configs/vit_small.yaml data.root=/data/imagenet optim.epochs=100
    torchrun --nproc_per_node 8 train.py --config configs/vit_base.yaml data.root=/data/imagenet

Reads top to bottom in data-flow order: config -> data -> method -> optimizer -> engine -> resume -> loop -> eval.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from fastvit_ssl import checkpoint, cli, distributed, runinfo, viz
from fastvit_ssl.checkpoint import CheckpointError, IncompatibleCheckpoint
from fastvit_ssl.config import Config, ConfigError, from_dict, load, model_differences
from fastvit_ssl.data.build import build_eval_data, build_train_data, resolve_root
from fastvit_ssl.engine.build import build_engine, check_engine
from fastvit_ssl.eval.encoder import random_encoder
from fastvit_ssl.eval.knn import knn_top1
from fastvit_ssl.guard import NonFiniteGuard, TrainingDiverged
from fastvit_ssl.kernels.dispatch import select_ops
from fastvit_ssl.methods.base import method_class
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models import attention
from fastvit_ssl.monitor import Monitor
from fastvit_ssl.optim.schedules import Schedules
from fastvit_ssl.preemption import EarlyStop, StopRequests

log = logging.getLogger("train")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    cfg = load(args.config, args.overrides)
    device = pick_device(cfg.run.device)
    check_for_device(cfg, device)
    distributed.init_from_env(device, cfg.engine.timeout_s)
    setup_logging()
    world = distributed.world_size()
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over "
            f"{world} processes; use a multiple of {world}"
        )
    run_dir = Path(cfg.run.out_dir) / cfg.run.name  # nothing is written there before everything is validated
    runinfo.check_writable(run_dir, "the run folder (run.out_dir/run.name)")
    torch.manual_seed(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic)

    method = method_class(cfg.method.name)
    data_root = resolve_root(cfg)
    loader, train_samples, classes = build_train_data(cfg, data_root, device, method.views(cfg))
    eval_data = build_eval_data(cfg, data_root, train_samples, classes)
    if eval_data is None and distributed.is_main():
        log.warning(
            "no kNN evaluation and no pictures: they need labelled images in %s/val/<class>/ beside train/<class>/",
            data_root,
        )
    method.before_training(cfg, run_dir, data_root)  # e.g. BEiT's tokenizer, trained into the run folder once
    ops = select_ops(cfg.run.kernels, device)
    model = build_method(cfg, ops).to(device)
    if cfg.run.init_from and not checkpoint.list_checkpoints(run_dir):  # a resume brings its own weights
        init_weights(cfg, model)
    engine = build_engine(cfg, model, device, ops)
    start_step, lr_scale = resume(cfg, run_dir, engine)
    if distributed.is_main():
        runinfo.record_start(run_dir, cfg, device, start_step)
    guard = NonFiniteGuard(
        cfg.run.max_bad_steps, cfg.run.on_nonfinite, cfg.run.rollback_lr_scale, cfg.run.max_rollbacks, lr_scale
    )

    total_steps = cfg.optim.epochs * loader.batches_per_epoch
    if start_step >= total_steps:
        log.info("%s finished at step %d already: evaluating only", run_dir, start_step)
    monitor = Monitor(run_dir, total_steps, cfg.data.batch_size, cfg.run.log_every, start_step, distributed.is_main())
    log.info(
        "%s %s on %s x%d: %d steps/epoch x %d epochs, from step %d -> %s",
        cfg.method.name,
        cfg.model.arch,
        device,
        world,
        loader.batches_per_epoch,
        cfg.optim.epochs,
        start_step,
        run_dir,
    )

    train_started = time.perf_counter()
    with StopRequests(cfg.run.max_minutes) as stops:
        try:
            step = train_loop(cfg, engine, loader, monitor, guard, stops, run_dir, start_step, eval_data, device)
        except EarlyStop:
            monitor.close()
            raise
    train_seconds = time.perf_counter() - train_started

    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(engine.checkpoints(run_dir)[-1]),
        "steps": step,
        "images_per_second": (step - start_step) * cfg.data.batch_size / max(train_seconds, 1e-9),
        "skipped_steps": guard.skipped,
        "rollbacks": guard.rollbacks,
        "fp16_overflows": engine.overflows,  # run.precision=fp16: steps the loss scaler skipped (this start)
    }
    evaluated = engine.evaluation_model() if eval_data and step == total_steps else None  # every rank: ZeRO-3
    if evaluated is not None:
        summary["knn_top1_random"] = evaluate_knn(cfg, random_encoder(cfg).to(device), eval_data, device)
        summary["knn_top1_pretrained"] = knn_check(cfg, evaluated, eval_data, device, run_dir)
        monitor.record(0, {"knn_top1": summary["knn_top1_random"]})  # the curve starts from the random encoder
        monitor.record(step, {"knn_top1": summary["knn_top1_pretrained"]})
        summary["pictures"] = [str(p) for p in viz.run_pictures(evaluated.backbone, data_root, run_dir)]
    plot = monitor.close()
    summary["wall_seconds"] = time.perf_counter() - started
    if distributed.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("run folder %s (curves: %s)", run_dir, plot.name if plot else "none")
        if "knn_top1_random" in summary:
            print(
                f"kNN top-1: random-init {summary['knn_top1_random']:.1f}% -> "
                f"pre-trained {summary['knn_top1_pretrained']:.1f}%",
                flush=True,
            )
    return summary


def train_loop(
    cfg: Config,
    engine,
    loader,
    monitor: Monitor,
    guard: NonFiniteGuard,
    stops: StopRequests,
    run_dir: Path,
    step: int,
    eval_data,
    device: torch.device,
) -> int:
    """Iterate from `step` to the end (or run.stop_at_step); returns the last step done. Raises EarlyStop, after a
    checkpoint, when a signal or the wall-clock budget stops the run."""
    steps_per_epoch = loader.batches_per_epoch
    schedules = Schedules(cfg, type(engine.model), steps_per_epoch)  # lr, weight decay, the method's own
    last_step = min(cfg.run.stop_at_step or math.inf, cfg.optim.epochs * steps_per_epoch)  # never past the end
    while step < last_step:
        epoch, first_batch = divmod(step, steps_per_epoch)
        loader.start(epoch, first_batch)
        for batch in loader:
            hp = schedules.at(step, guard.lr_scale)  # the schedules move every iteration
            metrics, finite = engine.step(batch.views, step, hp)
            metrics |= distributed.mean_over_ranks({k: v for k, v in metrics.items() if k.split("/")[0] == "loss"})
            step += 1  # a skipped step still consumes its batch and moves the schedules
            metrics |= hp.values
            monitor.train_step(
                step, step / steps_per_epoch, {**metrics, "skipped_images": batch.skipped, "finite": finite}
            )
            if guard.observe(finite, step):
                step = rollback(cfg, run_dir, engine, monitor)
                break
            epoch_end = step % steps_per_epoch == 0
            scheduled = (
                step == last_step
                or (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0)
                or (epoch_end and not cfg.run.ckpt_every)
            )
            why = stops.reason(device)  # on every rank at every step: they stop after the same one
            if scheduled or why:
                path = save_checkpoint(cfg, run_dir, engine, step, guard, monitor)
            if step == last_step:
                return step
            if why:
                raise EarlyStop(f"{why}: stopped at step {step}; checkpoint {path}; rerun the same command to continue")
        else:
            knn_every = cfg.eval.knn_every_epochs
            if eval_data and knn_every and (step // steps_per_epoch) % knn_every == 0:
                evaluated = engine.evaluation_model()  # on every rank (ZeRO-3 gathers); None but on rank 0
                if evaluated is not None:
                    monitor.record(step, {"knn_top1": knn_check(cfg, evaluated, eval_data, device, run_dir)})
    return step


def rollback(cfg: Config, run_dir: Path, engine, monitor: Monitor) -> int:
    """Back to the newest checkpoint (model, optimizer, RNG); returns its step."""
    found = engine.checkpoints(run_dir)
    if not found:
        raise TrainingDiverged(
            "non-finite steps before the first checkpoint: nothing to roll back to; lower "
            "optim.base_lr or set optim.clip_grad"
        )
    state = engine.load(found[-1], cfg.to_dict())
    checkpoint.set_rng_state(state["rng"])
    monitor.rewind(state["step"])
    log.warning("rolled back to %s (step %d)", found[-1], state["step"])
    return state["step"]


def knn_check(cfg: Config, method, eval_data, device, run_dir: Path) -> float:
    """kNN top-1 of the method's backbone; the method's pictures (if any) of the first validation images beside."""
    val = eval_data[1].dataset  # class by class: take 8 spread over the classes
    images = torch.stack([val[i][0] for i in range(0, len(val), max(1, len(val) // 8))][:8])
    method.pictures(images.to(device), run_dir / method.picture_name)
    return evaluate_knn(cfg, method.backbone, eval_data, device)


def evaluate_knn(cfg: Config, encoder, eval_data, device) -> float:
    started = time.perf_counter()
    top1 = knn_top1(encoder, *eval_data, device, cfg.eval.knn_k, cfg.eval.knn_temperature)
    log.info("kNN top-1 %.2f%% (k=%d, %.1fs)", top1, cfg.eval.knn_k, time.perf_counter() - started)
    return top1


def init_weights(cfg: Config, model) -> None:
    """Start from the weights (not the optimizer, not the step) of run.init_from: our checkpoint of the same model
    (config.model_differences) and method, or an official MoCo v3 one."""
    from fastvit_ssl.eval.encoder import read_checkpoint

    state = read_checkpoint(Path(cfg.run.init_from))
    diffs = [f"{k}: {a!r} there, {b!r} here" for k, a, b in model_differences(from_dict(state["config"]), cfg)]
    if diffs:
        raise CheckpointError(f"run.init_from={cfg.run.init_from} holds another model: {'; '.join(diffs)}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes the model keys do not name
        raise CheckpointError(f"run.init_from={cfg.run.init_from} does not fit this model: {str(e)[:400]}") from None
    log.info("weights from %s", cfg.run.init_from)


def resume(cfg: Config, run_dir: Path, engine) -> tuple[int, float]:
    """Restore model, optimizer and RNG from a checkpoint; returns (step to continue from, learning-rate scale)."""
    found = engine.checkpoints(run_dir)
    if cfg.run.resume == "none":
        if found:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass run.resume=auto to continue that run or "
                "choose another run.name"
            )
        return 0, 1.0
    candidates = list(reversed(found)) if cfg.run.resume == "auto" else [Path(cfg.run.resume)]
    for path in candidates:
        try:
            state = engine.load(path, cfg.to_dict())
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            if cfg.run.resume != "auto":
                raise
            log.warning("%s; trying an older checkpoint", e)
            continue
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return agreed(state["step"], run_dir, engine.device), state.get("lr_scale", 1.0)
    return agreed(0, run_dir, engine.device), 1.0


def agreed(step: int, run_dir: Path, device: torch.device) -> int:
    """The step every rank resumes from, or an error: ranks that see other checkpoints (a run folder not shared
    by every node) would train different steps against each other."""
    high = int(distributed.all_reduce_max(torch.tensor(step, device=device)))
    low = -int(distributed.all_reduce_max(torch.tensor(-step, device=device)))
    if low != high:
        raise CheckpointError(
            f"the ranks resume from different steps ({low} to {high}): every node must see the same run folder "
            f"{run_dir} (a shared file system), see docs/multinode.md"
        )
    return step


def save_checkpoint(cfg: Config, run_dir: Path, engine, step: int, guard: NonFiniteGuard, monitor: Monitor) -> Path:
    """Save unless the model holds a non-finite value: a checkpoint is always a state worth going back to. The
    metrics up to `step` are flushed first, so a run stopped after it has lost no row."""
    monitor.flush()
    norms = torch._foreach_norm([p.detach() for p in engine.model.parameters() if p.numel()])
    if not bool(torch.isfinite(torch.stack(norms)).all()):
        raise TrainingDiverged(f"the model holds non-finite values at step {step}; not saving it")
    client_state = {"step": step, "config": cfg.to_dict(), "rng": checkpoint.rng_state(), "lr_scale": guard.lr_scale}
    path = engine.save(run_dir, step, client_state, keep_last=cfg.run.keep_last + 1)
    log.info("saved %s", path)
    return path


def check_for_device(cfg: Config, device: torch.device) -> None:
    """The engine and the attention kernel the config names run on this device with this model, or a config
    error (before anything is written)."""
    check_engine(cfg, device)
    bias = cfg.model.rel_pos_bias != "none"
    try:
        attention.check_available(cfg.model.attention, device, bias, cfg.run.precision)
    except attention.AttentionUnavailable as e:
        raise ConfigError(str(e)) from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger().setLevel(logging.INFO if distributed.is_main() else logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # its one-time "building the font cache" notice


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="override-only YAML (default: the demo)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-4 data.batch_size=64")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main)
