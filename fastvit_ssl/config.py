"""Configuration: dataclass schema with defaults -> YAML overrides -> dotted CLI overrides -> validation.

The defaults are the MoCo v3 ViT recipe of the paper (ViT-B, batch 4096, AdamW lr 1.5e-4 x bs/256, wd 0.1,
300 epochs with 40 warm-up, tau 0.2, m 0.99 -> 1 cosine, frozen random patch projection). A YAML file only
overrides keys that exist in the schema; so do `section.key=value` arguments on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fastvit_ssl.models.attention import BACKENDS
from fastvit_ssl.models.vit import ARCH_SPECS


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and how."""


@dataclass
class ModelConfig:
    arch: Literal[tuple(ARCH_SPECS)] = "vit_base"
    img_size: int = 224
    frozen_patch_embed: bool = True  # MoCo v3's random frozen patch projection ("stop-grad-conv1")
    global_pool: Literal["token", "avg", "avg_normed"] = "token"  # avg_normed: mean of the normed tokens (BEiT)
    grad_checkpointing: bool = False  # recompute ViT block activations in the backward pass to save memory
    compile: bool = False  # torch.compile every encoder block: LayerNorm, GELU, bias and residual adds fused
    # torch.compile's mode: reduce-overhead and max-autotune replay CUDA graphs (static shapes: a ViT's are)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    pos_embed: Literal["sincos", "learned", "none"] = "sincos"  # fixed 2-D sin-cos (MoCo v3), learned (SiT), none
    init: Literal["mocov3", "trunc_normal", "beit"] = "mocov3"  # xavier; DeiT's truncated normal (0.02); + BEiT's
    num_heads: int = 0  # 0: the arch's (MoCo v3's ViT-S has 12 heads, DeiT's and SiT's 6)
    rel_pos_bias: Literal["none", "shared", "per_block"] = "none"  # BEiT: shared (pre-training), per_block
    layer_scale: float = 0.0  # LayerScale's initial value (BEiT: 0.1 for B, 1e-5 for L); 0: none
    qkv_bias: Literal["all", "qv"] = "all"  # qv: learned biases on q and v only (BEiT)
    mask_token: bool = False  # a learned [MASK] embedding for masked patches (BEiT)
    # the attention kernel: auto (torch's SDPA picks) | flash | efficient | cudnn | math | flex | explicit (timm
    # 0.4.9's plain ops) | flash_attn2 | flash_attn3 | flash_attn4 (the flash-attn package); see models/attention.py
    attention: Literal[BACKENDS] = "auto"


@dataclass
class MethodConfig:
    name: Literal["mocov3", "sit", "beit"] = "mocov3"  # its settings live in the section of that name (mocov3: moco)


@dataclass
class MocoConfig:
    dim: int = 256  # output of projector and predictor
    mlp_dim: int = 4096  # hidden width of both MLPs
    temperature: float = 0.2
    momentum: float = 0.99  # start value; rises to 1 on a half-cosine when momentum_cosine
    momentum_cosine: bool = True


@dataclass
class SitConfig:
    """SiT (Ahmed et al. 2021): group-masked model learning + contrastive learning against a momentum teacher."""

    dim: int = 256  # output of the contrastive head
    mlp_dim: int = 4096  # hidden width of the contrastive head
    temperature: float = 0.2
    momentum: float = 0.996  # teacher EMA at the start; rises to 1 on a half-cosine when momentum_cosine
    momentum_cosine: bool = True
    recon_weight: float = 1.0  # lambda of the reconstruction loss (the official README uses 5 on small data)
    corrupt_fraction: float = 0.5  # each view: random rectangles until at least this fraction is covered
    corrupt_fill: Literal["zeros", "noise", "self"] = "zeros"  # self: content from elsewhere in the same image
    max_side: float = 0.3  # rectangle sides from 1 pixel to below this fraction of the image side
    replace_prob: float = 0.5  # per image, the corruption is instead...
    replace_fraction: float = 0.3  # ...this fraction replaced by the same regions of another image of the batch
    drop_path: float = 0.1  # stochastic depth of the student
    # the reconstruction loss over ranks: global (the masked pixels of the global batch, whatever the number of
    # ranks) or per_rank (each rank's own mean, averaged over ranks, as the official code with DDP)
    loss_reduction: Literal["global", "per_rank"] = "global"


@dataclass
class BeitConfig:
    """BEiT (Bao et al. 2021): masked prediction of visual tokens with an LM head, no momentum networks."""

    tokenizer: Literal["trained", "dalle"] = "trained"  # a small dVAE trained on your images, or DALL-E's encoder
    tokenizer_path: str = ""  # dalle: its converted weights (required); trained: "" trains one into the run folder
    tokenizer_vocab: int = 1024  # trained: codes of the tokenizer trained for you
    tokenizer_epochs: int = 10  # trained: its epochs over root/train
    mask_patches: int = 75  # target masked patches per image (BEiT: 75 of 14 x 14, ~40%)
    mask_min_patches: int = 16  # smallest block area drawn
    mask_min_aspect: float = 0.3  # block aspect ratios from this to its inverse
    drop_path: float = 0.1  # stochastic depth of the encoder
    # the masked-token loss over ranks: global (the masked tokens of the global batch) or per_rank (each rank's
    # own mean, averaged over ranks, as the official code with DDP)
    loss_reduction: Literal["global", "per_rank"] = "global"


@dataclass
class DataConfig:
    root: str = ""  # folder holding train/ (and val/ for kNN) as class sub-folders; "" builds the demo data set
    backend: Literal["auto", "torch", "dali"] = "auto"  # auto: DALI where it is installed, else Pillow + torch
    batch_size: int = 4096  # global, over all ranks
    num_workers: int = 8  # loader processes per rank
    min_scale: float = 0.08  # smallest crop area of RandomResizedCrop
    uint8_views: bool = False  # views as [B, S, S, 3] uint8: 4x fewer bytes to the GPU, normalised in the encoder
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # of the random resized crop (SiT: bicubic)


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars", "lamb"] = "adamw"
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW, LAMB
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # LARS
    trust_coefficient: float = 0.001  # LARS
    epochs: int = 300
    warmup_epochs: float = 40
    min_lr: float = 0.0  # the cosine ends here (not scaled by the batch)
    weight_decay_end: float = -1.0  # >= 0: weight decay follows a cosine from weight_decay to this; < 0: constant
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    clip_mode: Literal["global", "per_tensor"] = "global"  # one norm over all tensors, or each tensor on its own


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_every_epochs: int = 0  # 0: kNN only at the end


@dataclass
class EngineConfig:
    name: Literal["local", "deepspeed"] = "local"  # deepspeed: ZeRO stages and bf16 through DeepSpeed
    zero_stage: int = 1  # 0-3, with name=deepspeed
    timeout_s: float = 600.0  # a collective that waits longer (a rank died) ends the run


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = ""  # run folder is out_dir/name; "": <config file name>, or <config>-<data folder> with data.root
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: with dynamic loss scaling, for GPUs without bf16
    kernels: Literal["reference", "fused"] = "reference"
    log_every: int = 10  # steps between progress lines
    ckpt_every: int = 0  # steps between checkpoints; 0: once per epoch
    keep_last: int = 2  # checkpoints kept besides the final one
    resume: str = "auto"  # auto: continue from the newest checkpoint in the run folder | none | a checkpoint path
    init_from: str = ""  # a new run starts from these weights (ours, or an official MoCo v3 checkpoint), step 0
    stop_at_step: int = 0  # stop (and checkpoint) after this step, as if interrupted; 0: run to the end
    max_minutes: float = 0.0  # stop (checkpoint, exit 3) after this much training in one process; 0: no budget
    max_bad_steps: int = 3  # consecutive non-finite steps (each skipped) before on_nonfinite acts
    on_nonfinite: Literal["rollback", "stop"] = "rollback"  # back to the last checkpoint, or stop with a message
    rollback_lr_scale: float = 0.5  # the learning rate is multiplied by this at each rollback
    max_rollbacks: int = 2
    deterministic: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    sit: SitConfig = field(default_factory=SitConfig)
    beit: BeitConfig = field(default_factory=BeitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a file from configs/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...), not {type(tree).__name__}")
        _apply_tree(cfg, tree, where=str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.base_lr=1e-4")
        _set(cfg, key.strip(), yaml.safe_load(text) if text.strip() else "", where="command line")
    if not cfg.run.name:
        cfg.run.name = default_run_name(path, cfg.data.root)
    validate(cfg)
    return cfg


def default_run_name(config_path: Path | None, data_root: str) -> str:
    """The config file's name, and the data folder's when there is one: `demo`, `vit_small-imagenet`. Two data
    sets never share a run folder by default."""
    name = config_path.stem if config_path is not None else "run"
    folder = Path(data_root).expanduser().resolve().name if data_root else ""
    return f"{name}-{folder}" if folder else name


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    _apply_tree(cfg, tree, where="stored config")
    return cfg


def _apply_tree(cfg: Config, tree: dict, where: str) -> None:
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, where)


def _set(cfg: Config, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: {dotted!r} must name section.key, e.g. optim.base_lr")
    section_name, key = parts
    section = getattr(cfg, _known(section_name, [f.name for f in dataclasses.fields(cfg)], where), None)
    key = _known(key, [f.name for f in dataclasses.fields(section)], where, prefix=f"{section_name}.")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, f"{where}: {dotted}"))


def _known(name: str, names: list[str], where: str, prefix: str = "") -> str:
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(prefix + n for n in names)}"
    raise ConfigError(f"{where}: unknown key {prefix}{name}{hint}")


def _coerce(value: Any, hint: Any, what: str) -> Any:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{what} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{what} = {value!r} must be of type {getattr(hint, '__name__', hint)}")


FUSED_CONTRASTIVE_MAX_DIM = 256  # kernels/contrastive.py's MAX_DIM (a test keeps the two equal)


def validate(cfg: Config) -> None:
    """Value checks that need no other state than the config itself."""
    checks = [
        (cfg.model.img_size > 0, "model.img_size must be positive"),
        (cfg.moco.dim > 0 and cfg.moco.mlp_dim > 0, "moco.dim and moco.mlp_dim must be positive"),
        (cfg.moco.temperature > 0, "moco.temperature must be positive (the paper uses 0.2 for ViT)"),
        (0 <= cfg.moco.momentum <= 1, "moco.momentum must lie in [0, 1] (the paper uses 0.99)"),
        (cfg.data.batch_size > 0, "data.batch_size (global) must be positive"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0 < cfg.data.min_scale <= 1, "data.min_scale must lie in (0, 1]"),
        (cfg.optim.base_lr > 0, "optim.base_lr must be positive"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1 and optim.beta2 must lie in [0, 1)"),
        (cfg.optim.eps > 0, "optim.eps must be positive"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must lie in [0, 1)"),
        (cfg.optim.trust_coefficient > 0, "optim.trust_coefficient must be positive"),
        (cfg.optim.epochs > 0, "optim.epochs must be positive"),
        (
            0 <= cfg.optim.warmup_epochs < cfg.optim.epochs,
            f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} must lie in [0, optim.epochs={cfg.optim.epochs}): "
            "lower the warm-up or raise optim.epochs",
        ),
        (cfg.optim.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping)"),
        (cfg.eval.knn_k > 0, "eval.knn_k must be positive"),
        (cfg.eval.knn_temperature > 0, "eval.knn_temperature must be positive"),
        (cfg.eval.knn_every_epochs >= 0, "eval.knn_every_epochs must be >= 0"),
        (cfg.run.log_every > 0, "run.log_every must be positive"),
        (cfg.run.ckpt_every >= 0 and cfg.run.keep_last >= 0, "run.ckpt_every and run.keep_last must be >= 0"),
        (cfg.run.stop_at_step >= 0, "run.stop_at_step must be >= 0"),
        (cfg.run.max_minutes >= 0, "run.max_minutes must be >= 0 (0: no wall-clock budget)"),
        (cfg.engine.zero_stage in (0, 1, 2, 3), "engine.zero_stage must be 0, 1, 2 or 3"),
        (cfg.run.max_bad_steps > 0 and cfg.run.max_rollbacks >= 0, "run.max_bad_steps > 0 and run.max_rollbacks >= 0"),
        (0 < cfg.run.rollback_lr_scale <= 1, "run.rollback_lr_scale must lie in (0, 1]"),
        (cfg.engine.timeout_s > 0, "engine.timeout_s must be positive"),
        (cfg.run.name not in ("", ".", "..") and "/" not in cfg.run.name, "run.name must be a plain folder name"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    section = method_section(cfg)
    dim = getattr(getattr(cfg, section), "dim", 0)  # of the contrastive loss (BEiT has none)
    if cfg.run.kernels == "fused" and dim > FUSED_CONTRASTIVE_MAX_DIM:
        raise ConfigError(
            f"{section}.dim={dim}: the fused contrastive kernel takes at most {FUSED_CONTRASTIVE_MAX_DIM} "
            f"features; use run.kernels=reference or a smaller {section}.dim"
        )
    spec = ARCH_SPECS[cfg.model.arch]
    if cfg.model.img_size % spec.patch_size:
        raise ConfigError(
            f"model.img_size={cfg.model.img_size} must be a multiple of {cfg.model.arch}'s patch {spec.patch_size}"
        )
    heads = cfg.model.num_heads or spec.num_heads
    if cfg.model.num_heads < 0 or spec.embed_dim % heads:
        raise ConfigError(
            f"model.num_heads={cfg.model.num_heads} must divide {cfg.model.arch}'s width {spec.embed_dim}"
        )
    if cfg.method.name == "sit":
        validate_sit(cfg)
    if cfg.method.name == "beit":
        validate_beit(cfg)
    if cfg.optim.clip_mode == "per_tensor" and cfg.engine.name == "deepspeed":
        raise ConfigError(
            "optim.clip_mode=per_tensor is not available under DeepSpeed, which clips by the global norm inside its "
            "step; use optim.clip_mode=global or engine.name=local"
        )


def validate_sit(cfg: Config) -> None:
    sit, side = cfg.sit, cfg.model.img_size
    checks = [
        (sit.dim > 0 and sit.mlp_dim > 0, "sit.dim and sit.mlp_dim must be positive"),
        (sit.temperature > 0, "sit.temperature must be positive (SiT uses 0.2)"),
        (0 <= sit.momentum <= 1, "sit.momentum must lie in [0, 1] (SiT uses 0.996)"),
        (sit.recon_weight >= 0, "sit.recon_weight must be >= 0"),
        (0 < sit.corrupt_fraction < 1, "sit.corrupt_fraction must lie in (0, 1) (SiT uses 0.5)"),
        (0 <= sit.replace_prob <= 1, "sit.replace_prob must lie in [0, 1]"),
        (0 < sit.replace_fraction < 1, "sit.replace_fraction must lie in (0, 1) (SiT uses 0.3)"),
        (0 <= sit.drop_path < 1, "sit.drop_path must lie in [0, 1)"),
        (
            1 < int(side * sit.max_side) < side,
            f"sit.max_side={sit.max_side} of a {side}px image must allow rectangles of 1 to "
            f"{int(side * sit.max_side) - 1} pixels; use a larger value or model.img_size",
        ),
        (cfg.model.global_pool == "token", "SiT reads the class token: use model.global_pool=token"),
        (not ARCH_SPECS[cfg.model.arch].conv_stem, "SiT reconstructs patches: use an arch without the conv stem"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate_beit(cfg: Config) -> None:
    beit, spec = cfg.beit, ARCH_SPECS[cfg.model.arch]
    patches = (cfg.model.img_size // spec.patch_size) ** 2
    checks = [
        (0 < beit.mask_patches < patches, f"beit.mask_patches must lie in 1..{patches - 1} (the patches of an image)"),
        (0 < beit.mask_min_patches <= beit.mask_patches, "beit.mask_min_patches must lie in 1..beit.mask_patches"),
        (0 < beit.mask_min_aspect <= 1, "beit.mask_min_aspect must lie in (0, 1] (BEiT uses 0.3)"),
        (beit.tokenizer_vocab > 1 and beit.tokenizer_epochs > 0, "beit.tokenizer_vocab and _epochs must be positive"),
        (0 <= beit.drop_path < 1, "beit.drop_path must lie in [0, 1)"),
        (cfg.model.mask_token, "BEiT replaces masked patches by a learned token: set model.mask_token=true"),
        (cfg.model.global_pool != "avg", "BEiT's LM head reads normed tokens: model.global_pool=avg_normed or token"),
        (not spec.conv_stem, "BEiT masks patch embeddings: use an arch without the conv stem"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def method_section(cfg: Config) -> str:
    """The config section that holds the settings of cfg.method.name."""
    return {"mocov3": "moco"}.get(cfg.method.name, cfg.method.name)


def save_yaml(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def to_deepspeed(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from ours (never kept as a second, hand-edited copy).

    No gradient accumulation: MoCo's negatives are the keys of one forward pass, so accumulating micro-batches would
    train with fewer negatives than the batch size says; the global batch is one step over all ranks.
    """
    ds = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # ZeRO skips an update whose gradients are not finite; explicit, the engine reports it to the NaN guard
        "bf16": {"enabled": cfg.run.precision == "bf16", "check_grad_overflow": True},
        # dynamic loss scaling as torch's GradScaler: from 2^16, halved at each overflow, doubled after 2,000 clean
        # steps
        "fp16": {
            "enabled": cfg.run.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 2000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        },
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "gradient_clipping": cfg.optim.clip_grad,  # always explicit: DeepSpeed's default (1.0) would clip silently
        "zero_allow_untested_optimizer": True,  # LARS/LAMB: ZeRO-correct through optim/trust_ratio.py
        "steps_per_print": 2**31 - 1,  # our monitor prints
        "wall_clock_breakdown": False,
    }
    return ds
