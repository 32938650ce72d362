"""Configuration: dataclass schema with defaults -> YAML overrides -> dotted CLI overrides -> validation.

The defaults are the MoCo v3 ViT recipe of the paper (ViT-B, batch 4096, AdamW lr 1.5e-4 x bs/256, wd 0.1,
300 epochs with 40 warm-up, tau 0.2, m 0.99 -> 1 cosine, frozen random patch projection). A YAML file only
overrides keys that exist in the schema; so do `section.key=value` arguments on the command line.

The sections of the methods (moco:, sit:, beit:, ...) belong to the methods: each method file registers its
section's dataclass and its checks (`register_method`) when fastvit_ssl.methods is imported, which `load` and
`from_dict` do first. This module names no method but the default one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fastvit_ssl.specs import ARCH_SPECS, ATTENTION_KERNELS, CONTRASTIVE_KERNEL_MAX_DIM, MODEL_KEYS


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and how."""


@dataclass(frozen=True)
class MethodSection:
    """What a method registers: its name (method.name), its YAML section and dataclass, its checks, and the keys of
    its section that define its tensors (checkpoints compare them with specs.MODEL_KEYS)."""

    name: str
    section: str
    schema: type
    validate: Callable[[Config], None]
    model_keys: tuple[str, ...] = ()


METHODS: dict[str, MethodSection] = {}  # by method name, in registration order
ALIASES: dict[tuple[str, str, Any], Any] = {}  # (section, key, former value) -> its value now
DEFAULT_METHOD = "mocov3"  # the paper this project started from; the registry's default


def register_method(
    name: str, section: str, schema: type, validate: Callable[[Config], None], model_keys: tuple[str, ...] = ()
) -> None:
    METHODS[name] = MethodSection(name, section, schema, validate, model_keys)


def register_alias(section: str, key: str, former: Any, now: Any) -> None:
    """A value a setting had under an earlier name (stored configs and YAML files still say it)."""
    ALIASES[section, key, former] = now


def _discover() -> None:
    """Import the method files so that their sections are registered (plugin discovery)."""
    importlib.import_module("fastvit_ssl.methods")


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
    # fixed 2-D sin-cos (MoCo v3; MAE's has the column's half first), learned (SiT), none (BEiT)
    pos_embed: Literal["sincos", "sincos_cols_first", "learned", "none"] = "sincos"
    # xavier (MoCo v3's); trunc_normal (DeiT's, SiT's: 0.02); depth_scaled (BEiT's: 0.02 cut at 1 std, / sqrt(2 l));
    # xavier_joint (MAE's: q/k/v as one matrix)
    init: Literal["xavier", "trunc_normal", "depth_scaled", "xavier_joint"] = "xavier"
    num_heads: int = 0  # 0: the arch's (MoCo v3's ViT-S has 12 heads, DeiT's and SiT's 6)
    rel_pos_bias: Literal["none", "shared", "per_block"] = "none"  # BEiT: shared (pre-training), per_block
    layer_scale: float = 0.0  # LayerScale's initial value (BEiT: 0.1 for B, 1e-5 for L); 0: none
    qkv_bias: Literal["all", "qv"] = "all"  # qv: learned biases on q and v only (BEiT)
    mask_token: bool = False  # a learned [MASK] embedding for masked patches (BEiT)
    # the attention kernel: auto (torch's SDPA picks) | flash | efficient | cudnn | math | flex | explicit (timm
    # 0.4.9's plain ops) | flash_attn2 | flash_attn3 | flash_attn4 (the flash-attn package); see models/attention.py
    attention: Literal[ATTENTION_KERNELS] = "auto"


@dataclass
class MethodConfig:
    name: str = DEFAULT_METHOD  # a registered method; its settings live in its own section (mocov3: moco)


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
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # every registered method's section, by section name (cfg.moco, cfg.sit, ...: see __getattr__)
    methods: dict[str, Any] = field(default_factory=lambda: {m.section: m.schema() for m in METHODS.values()})

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods", {})
        if name in methods:
            return methods[name]
        raise AttributeError(name)

    @property
    def method_section(self) -> Any:
        """The section of the method this config trains."""
        return self.methods[METHODS[self.method.name].section]

    def sections(self) -> dict[str, Any]:
        """Every section by name, the methods' included."""
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        return {**fixed, **self.methods}

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides; validated."""
    _discover()
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
    _discover()
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
    sections = cfg.sections()
    section = sections[_known(section_name, list(sections), where)]
    key = _known(key, [f.name for f in dataclasses.fields(section)], where, prefix=f"{section_name}.")
    hint = typing.get_type_hints(type(section))[key]
    value = ALIASES.get((section_name, key, value), value) if isinstance(value, str) else value
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


def validate(cfg: Config) -> None:
    """Value checks that need no other state than the config itself; then the method's own (its registration)."""
    if cfg.method.name not in METHODS:
        close = difflib.get_close_matches(cfg.method.name, list(METHODS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"the methods are {', '.join(METHODS)}"
        raise ConfigError(f"method.name={cfg.method.name!r} is not a method of this project; {hint}")
    check(
        [
            (cfg.model.img_size > 0, "model.img_size must be positive"),
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
            (
                0 <= cfg.optim.min_lr <= cfg.optim.base_lr,
                f"optim.min_lr={cfg.optim.min_lr:g} must lie in [0, optim.base_lr={cfg.optim.base_lr:g}]: the cosine "
                "falls from the peak lr (base_lr x batch / 256) to this absolute value, usually 0 or 1e-6",
            ),
            (cfg.optim.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping)"),
            (cfg.eval.knn_k > 0, "eval.knn_k must be positive"),
            (cfg.eval.knn_temperature > 0, "eval.knn_temperature must be positive"),
            (cfg.eval.knn_every_epochs >= 0, "eval.knn_every_epochs must be >= 0"),
            (0 <= cfg.run.seed < 2**63, "run.seed must be a non-negative integer (below 2**63)"),
            (cfg.run.log_every > 0, "run.log_every must be positive"),
            (cfg.run.ckpt_every >= 0 and cfg.run.keep_last >= 0, "run.ckpt_every and run.keep_last must be >= 0"),
            (cfg.run.stop_at_step >= 0, "run.stop_at_step must be >= 0"),
            (cfg.run.max_minutes >= 0, "run.max_minutes must be >= 0 (0: no wall-clock budget)"),
            (cfg.engine.zero_stage in (0, 1, 2, 3), "engine.zero_stage must be 0, 1, 2 or 3"),
            (
                cfg.run.max_bad_steps > 0 and cfg.run.max_rollbacks >= 0,
                "run.max_bad_steps > 0 and run.max_rollbacks >= 0",
            ),
            (0 < cfg.run.rollback_lr_scale <= 1, "run.rollback_lr_scale must lie in (0, 1]"),
            (cfg.engine.timeout_s > 0, "engine.timeout_s must be positive"),
            (cfg.run.name not in ("", ".", "..") and "/" not in cfg.run.name, "run.name must be a plain folder name"),
            (
                not (cfg.optim.clip_mode == "per_tensor" and cfg.engine.name == "deepspeed"),
                "optim.clip_mode=per_tensor is not available under DeepSpeed, which clips by the global norm inside "
                "its step; use optim.clip_mode=global or engine.name=local",
            ),
        ]
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
    METHODS[cfg.method.name].validate(cfg)


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_contrastive_dim(cfg: Config, section: str, dim: int) -> None:
    """The fused contrastive kernel's limit, for the methods that use it."""
    if cfg.run.kernels == "fused" and dim > CONTRASTIVE_KERNEL_MAX_DIM:
        raise ConfigError(
            f"{section}.dim={dim}: the fused contrastive kernel takes at most {CONTRASTIVE_KERNEL_MAX_DIM} "
            f"features; use run.kernels=reference or a smaller {section}.dim"
        )


def model_differences(stored: Config, current: Config) -> list[tuple[str, Any, Any]]:
    """What makes the model of `stored` another model than that of `current`, as (key, stored value, current
    value): the method, specs.MODEL_KEYS and the method's own model keys. The one rule of "the same model", for
    resume, run.init_from and evaluations."""
    if stored.method.name != current.method.name:
        return [("method.name", stored.method.name, current.method.name)]
    method = METHODS[current.method.name]
    pairs = [(f"model.{k}", model_value(stored, k), model_value(current, k)) for k in MODEL_KEYS]
    there, here = stored.methods[method.section], current.methods[method.section]
    pairs += [(f"{method.section}.{k}", getattr(there, k), getattr(here, k)) for k in method.model_keys]
    return [(key, a, b) for key, a, b in pairs if a != b]


def model_value(cfg: Config, key: str) -> Any:
    """cfg.model.<key>, defaults resolved (num_heads 0 is the arch's)."""
    if key == "num_heads":
        return cfg.model.num_heads or ARCH_SPECS[cfg.model.arch].num_heads
    return getattr(cfg.model, key)


def save_yaml(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
