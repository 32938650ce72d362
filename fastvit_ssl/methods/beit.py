"""BEiT (Bao, Dong, Piao, Wei 2021; microsoft/unilm beit/): masked image modelling with visual tokens.

A frozen visual tokenizer turns each image into one token per patch (tokenizer/). About 40% of the patches are
masked in blocks (data/masking.py); the ViT sees the image with those patches' embeddings replaced by a learned
[MASK] token, and a linear LM head predicts, at each masked position, the token the tokenizer gave that patch:
    loss = mean over the masked patches of the global batch of CE(LM head(final-norm token), visual token).
No momentum networks. The ViT has no absolute positions but one relative position bias shared by all blocks,
LayerScale, q and v biases, and BEiT's initialisation (model.* options, configs/beit_*.yaml).

Masks are drawn from (run seed, step, image index in the global batch): the same after a resume and whatever the
number of ranks. The tokenizer reads the same view as the ViT, resized on the device to its own input size
(official code: the crop resized twice in the loader; here resized from the ViT's view, antialiased).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.checkpoint import CheckpointError, IncompatibleCheckpoint
from fastvit_ssl.config import Config, check, register_alias
from fastvit_ssl.data.augment import ViewAugment, imagenet_stats
from fastvit_ssl.data.masking import BlockMasking, mask_rng, masked_positions
from fastvit_ssl.methods.base import Method, register, weight_decay_groups
from fastvit_ssl.methods.losses import linear_cross_entropy_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.vit import VisionTransformer, normalize_uint8, trunc_normal_within_std_
from fastvit_ssl.specs import ARCH_SPECS, encoder_flops
from fastvit_ssl.tokenizer.base import VisualTokenizer, state_digest


@dataclass
class BeitConfig:
    """The `beit:` section: masked prediction of visual tokens with an LM head, no momentum networks."""

    # a small dVAE trained on your images, DALL-E's encoder, or DALL-E's encoder with random weights (its full
    # cost for the benchmarks; it teaches nothing)
    tokenizer: Literal["trained", "dalle", "dalle_random"] = "trained"
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


register_alias("model", "init", "beit", "depth_scaled")  # model.init's name for BEiT's init before 2026-12-04

IGNORE = -100  # target of padding positions (images with fewer masked patches than the target count)


class LMHead(nn.Linear):
    """Linear(D, vocab) whose forward is its cross-entropy summed over the counted rows: the logits of all masked
    tokens never exist at once with the fused loss (kernels/linear_ce.py)."""

    def __init__(self, dim: int, vocab: int, loss_fn: Callable = linear_cross_entropy_ref):
        super().__init__(dim, vocab)
        self.loss_fn = loss_fn
        trunc_normal_within_std_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(tokens, self.weight, self.bias, targets, IGNORE, "sum")


class MaskedImageModel(nn.Module):
    """The trained part: encoder (with [MASK] token) -> final-norm tokens at the masked positions -> LM head."""

    def __init__(self, encoder: VisionTransformer, vocab: int, loss_fn: Callable):
        super().__init__()
        self.encoder = encoder
        self.lm_head = LMHead(encoder.embed_dim, vocab, loss_fn)

    def hidden(self, images: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """-> [B, count, D] final-norm tokens at `positions` ([B, count] patch indices)."""
        tokens = self.encoder.forward_tokens(images, mask)[:, 1:]  # (B, L, D)
        return tokens.gather(1, positions[..., None].expand(-1, -1, tokens.shape[-1]))

    def forward(self, images, mask, positions, targets) -> torch.Tensor:
        """The summed cross-entropy of the masked tokens (padding positions' targets are IGNORE)."""
        hidden = self.hidden(images, mask, positions)
        return self.lm_head(hidden.flatten(0, 1), targets.flatten())


@register
class BEiT(Method):
    """The frozen tokenizer is not a submodule: checkpoints hold its SHA-256 (`tokenizer_digest`), not its weights
    (DALL-E's encoder alone is 216 MB), and refuse to load into a run with another tokenizer.

    Args:
    encoder: the ViT, built with BEiT's options (mask token, relative position bias, ...).
    tokenizer: the frozen visual tokenizer; its grid must be the ViT's patch grid.
    masking: the block masking of one image.
    seed: the run's seed; each step's masks come from (seed, step, image index).
    loss_fn: the LM head's loss, linear_cross_entropy_ref or the fused kernel.
    loss_reduction: "global" (the mean over the masked tokens of the global batch) or "per_rank" (each rank's own
        mean, averaged over ranks, as the official code with DDP).
    """

    name, section, Config = "beit", "beit", BeitConfig
    model_keys = ("tokenizer", "tokenizer_vocab")
    backbone_name = "online.encoder"
    lr_warmup = "linspace"  # its cosine_scheduler: np.linspace(0, lr, warm-up iterations)
    picture_name = "masked_predictions.png"
    finetune_layer_decay = 0.65  # the official fine-tuning recipe's
    recipe = "beit_vit_base.yaml"
    suite = (("vit_base", 128, 1.5),)

    def __init__(
        self,
        encoder: VisionTransformer,
        tokenizer: VisualTokenizer,
        masking: BlockMasking,
        seed: int = 0,
        loss_fn: Callable = linear_cross_entropy_ref,
        loss_reduction: str = "global",
    ):
        super().__init__()
        if tokenizer.grid != encoder.grid:
            grids = f"the tokenizer makes {tokenizer.grid}^2 tokens, the ViT has {encoder.grid}^2 patches"
            raise ValueError(f"BEiT: {grids}")
        self.online = MaskedImageModel(encoder, tokenizer.vocab_size, loss_fn)
        self.__dict__["tokenizer"] = tokenizer.requires_grad_(False)  # not a submodule: see the class docstring
        self.register_buffer("tokenizer_digest", digest_tensor(tokenizer.digest()))
        self.masking, self.seed, self.loss_reduction = masking, seed, loss_reduction

    def _apply(self, fn, recurse=True):
        """.to(), .double(), ...: the tokenizer moves with the method."""
        self.tokenizer._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse a checkpoint made with another tokenizer; those from before 2026-12-04 hold its weights, which are
        compared and dropped."""
        legacy = {
            k[len(prefix) + 10 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "tokenizer.")
        }
        stored = state_dict.get(prefix + "tokenizer_digest")
        if stored is None and legacy:
            stored = digest_tensor(state_digest(legacy))
        if stored is not None and not torch.equal(stored.cpu(), self.tokenizer_digest.cpu()):
            raise IncompatibleCheckpoint(
                f"this checkpoint was trained with another visual tokenizer (sha256 {bytes(stored.tolist()).hex()[:12]}"
                f", this run's is {bytes(self.tokenizer_digest.tolist()).hex()[:12]}); set beit.tokenizer_path to the "
                "one it was trained with"
            )
        state_dict.setdefault(prefix + "tokenizer_digest", self.tokenizer_digest)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def build(cls, cfg: Config, ops) -> BEiT:
        b = cfg.beit
        grid = cfg.model.img_size // ARCH_SPECS[cfg.model.arch].patch_size
        masking = BlockMasking((grid, grid), b.mask_patches, b.mask_min_patches, b.mask_min_aspect)
        encoder = build_encoder(cfg, ops["patch_embed"], drop_path_rate=b.drop_path)
        return cls(encoder, load_tokenizer(cfg), masking, cfg.run.seed, ops["lm_head_loss"], b.loss_reduction)

    @staticmethod
    def validate(cfg: Config) -> None:
        beit, spec = cfg.beit, ARCH_SPECS[cfg.model.arch]
        patches = (cfg.model.img_size // spec.patch_size) ** 2
        path = beit.tokenizer_path
        check(
            [
                (
                    0 < beit.mask_patches < patches,
                    f"beit.mask_patches must lie in 1..{patches - 1} (an image's patches)",
                ),
                (
                    0 < beit.mask_min_patches <= beit.mask_patches,
                    "beit.mask_min_patches must lie in 1..beit.mask_patches",
                ),
                (0 < beit.mask_min_aspect <= 1, "beit.mask_min_aspect must lie in (0, 1] (BEiT uses 0.3)"),
                (
                    beit.tokenizer_vocab > 1 and beit.tokenizer_epochs > 0,
                    "beit.tokenizer_vocab and _epochs must be > 0",
                ),
                (0 <= beit.drop_path < 1, "beit.drop_path must lie in [0, 1)"),
                (cfg.model.mask_token, "BEiT replaces masked patches by a learned token: set model.mask_token=true"),
                (
                    cfg.model.global_pool != "avg",
                    "BEiT's LM head reads normed tokens: model.global_pool=avg_normed|token",
                ),
                (not spec.conv_stem, "BEiT masks patch embeddings: use an arch without the conv stem"),
                (
                    beit.tokenizer != "dalle" or Path(path).is_file(),
                    f"beit.tokenizer=dalle needs beit.tokenizer_path=<DALL-E's encoder as safetensors>, got {path!r}: "
                    "no such file. Convert OpenAI's released encoder.pkl once, as fastvit_ssl/tokenizer/dalle.py says, "
                    "or use beit.tokenizer=trained",
                ),
                (
                    beit.tokenizer != "trained" or not path or Path(path).is_file(),
                    f"beit.tokenizer_path={path}: no such file; train one with python -m fastvit_ssl.tokenizer.train, "
                    "or leave beit.tokenizer_path empty to have one trained into the run folder",
                ),
            ]
        )

    @classmethod
    def views(cls, cfg: Config) -> list:
        """One view: colour jitter (0.4, 0.4, 0.4) always, flip, random resized crop (bicubic); the tokenizer's input
        is made from the same view on the device."""
        jitter = dict(jitter_prob=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0)
        blank = dict(grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
        size, uint8 = cfg.model.img_size, cfg.data.uint8_views
        return [ViewAugment(size, cfg.data.min_scale, **jitter, **blank, uint8=uint8, interpolation="bicubic")]

    @classmethod
    def before_training(cls, cfg: Config, run_dir: Path, data_root: Path) -> None:
        """A tokenizer trained on the data into the run folder, when beit.tokenizer=trained names none (rank 0;
        kept across restarts: a finished file is not trained again)."""
        path = tokenizer_path(cfg)
        if cfg.beit.tokenizer == "trained" and not path.is_file() and distributed.is_main():
            from fastvit_ssl.tokenizer.dvae import PatchVQConfig
            from fastvit_ssl.tokenizer.train import train_tokenizer

            patch = ARCH_SPECS[cfg.model.arch].patch_size
            config = PatchVQConfig(image_size=cfg.model.img_size, patch=patch, vocab=cfg.beit.tokenizer_vocab)
            train_tokenizer(data_root, path, config, epochs=cfg.beit.tokenizer_epochs, seed=cfg.run.seed)
        distributed.barrier()

    @classmethod
    def finetuning_layout(cls, cfg: Config) -> dict:
        """BEiT's fine-tuning: every block its own relative position bias (each starts from the shared one), mean
        pooling and its norm, no [MASK] token."""
        return {"rel_pos_bias": "per_block", "global_pool": "avg", "mask_token": False}

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        grid = img_size // ARCH_SPECS[arch].patch_size
        masked = max(1, round(0.4 * grid * grid))
        return ["beit.tokenizer=dalle_random", f"beit.mask_patches={masked}", "beit.mask_min_patches=1"]

    @classmethod
    def step_flops(cls, cfg: Config, batch: int, keys: int) -> float:
        """One view: the encoder forward and backward (x3) and the LM head on the masked tokens; the frozen
        tokenizer (DALL-E's 8,192 tokens) is not counted."""
        D = ARCH_SPECS[cfg.model.arch].embed_dim
        encoder = encoder_flops(cfg.model.arch, cfg.model.img_size, batch)
        return 3 * encoder + 3 * 2 * batch * cfg.beit.mask_patches * D * 8192

    def prepare(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The view, its block masks (drawn on the host: [B, L] bool), the masked positions padded to the target
        count, the view's visual tokens [B, L] and those at the masked positions (IGNORE at padding), all on the
        view's device."""
        images = normalize_uint8(views[0]) if views[0].dtype == torch.uint8 else views[0]
        B, device, rank = images.shape[0], images.device, distributed.rank()
        masks = torch.stack([self.masking(mask_rng(self.seed, step, rank * B + i)) for i in range(B)])
        positions, valid = masked_positions(masks, self.masking.count)  # (B, count) each
        positions, valid = positions.to(device, non_blocking=True), valid.to(device, non_blocking=True)
        tokens = self.tokenizer.tokenize(images)  # (B, L)
        targets = tokens.gather(1, positions).masked_fill(~valid, IGNORE)
        mask = masks.flatten(1).to(device)
        return {"images": images, "mask": mask, "positions": positions, "tokens": tokens, "targets": targets}

    def online_inputs(self, batch) -> tuple:
        return batch["images"], batch["mask"], batch["positions"], batch["targets"]

    def targets(self, batch) -> torch.Tensor:
        """The visual tokens at the masked positions (made in `prepare`: the tokenizer is frozen)."""
        return batch["targets"]

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        # global: the mean over the masked patches of the global batch; ranks average their losses, so each rank
        # divides its sum by the global count over the number of ranks (one process computes the same mean as
        # many). per_rank: each rank's own mean, as the official code (DDP then averages).
        count = (targets != IGNORE).sum().float()
        if self.loss_reduction == "global":
            count = distributed.all_reduce_mean(count)
        return {"loss": outputs / count.clamp_min(1.0)}

    def param_groups(self) -> list[dict]:
        """As the official code: no weight decay for 1-D tensors, biases, the class token and positions."""
        return weight_decay_groups(self.online, exempt=("cls_token", "pos_embed"))

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, path: Path) -> bool:
        """Rows: image, masked image, its tokens decoded, the tokens predicted at the masked patches decoded
        (elsewhere the image's own): with a tokenizer that can decode (the trained one)."""
        if not hasattr(self.tokenizer, "decode"):
            return False
        from fastvit_ssl.data.preview import plot_grid

        was_training = self.training
        self.eval()
        batch = self.prepare([images], step=0)
        hidden = self.online.hidden(batch["images"], batch["mask"], batch["positions"])  # (B, count, D)
        head = self.online.lm_head
        predicted = (hidden.float() @ head.weight.float().t() + head.bias.float()).argmax(-1)  # (B, count)
        self.train(was_training)
        tokens = batch["tokens"]  # (B, L)
        positions, counted = batch["positions"], batch["targets"] != IGNORE
        guess = tokens.scatter(1, positions, torch.where(counted, predicted, tokens.gather(1, positions)))
        grid, pixels = self.tokenizer.grid, self.tokenizer.inputs(images)  # (B, 3, S, S) in [0, 1]
        cover = batch["mask"].view(-1, 1, grid, grid).float()
        cover = cover.repeat_interleave(pixels.shape[-1] // grid, 2).repeat_interleave(pixels.shape[-1] // grid, 3)
        rows = {
            "image": pixels,
            "masked": pixels * (1 - cover) + 0.5 * cover,
            "tokens decoded": self.tokenizer.decode(tokens),
            "predicted decoded": self.tokenizer.decode(guess),
        }
        mean, std = imagenet_stats(pixels.device)  # plot_grid takes normalised images
        plot_grid({k: list(((v - mean) / std).cpu()) for k, v in rows.items()}, path, by_rows=True)
        return True


def tokenizer_path(cfg: Config) -> Path:
    """Where the tokenizer's weights are: beit.tokenizer_path, or the run folder's trained one."""
    return Path(cfg.beit.tokenizer_path or Path(cfg.run.out_dir) / cfg.run.name / "tokenizer.safetensors")


def load_tokenizer(cfg: Config) -> VisualTokenizer:
    """The tokenizer of cfg.beit: DALL-E's from its weights file, or the trained one (BEiT.before_training makes it
    when it is trained into the run folder)."""
    from fastvit_ssl.tokenizer.dalle import DalleTokenizer
    from fastvit_ssl.tokenizer.dvae import PatchVQ

    grid = cfg.model.img_size // ARCH_SPECS[cfg.model.arch].patch_size
    if cfg.beit.tokenizer == "dalle_random":
        return DalleTokenizer(None, grid)
    path = tokenizer_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"no tokenizer at {path}: train.py trains one there first, or set beit.tokenizer_path")
    if cfg.beit.tokenizer == "dalle":
        return DalleTokenizer(path, grid)
    return PatchVQ.load(path)


def digest_tensor(hexdigest: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8)
