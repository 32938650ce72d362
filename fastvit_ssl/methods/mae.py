"""MAE (He, Chen, Xie, Li, Dollar, Girshick 2022; facebookresearch/mae): masked autoencoders.

Each image loses a random 75% of its patches (per image: the patches whose noise sorts last). The encoder runs on
the visible 25% only, with the class token; a light decoder (8 blocks of width 512) puts a learned mask token at
every removed patch, adds its own fixed sin-cos positions to all, and predicts every patch's pixels:
    loss = mean over the removed patches of mean over the patch's pixels of (prediction - target)^2,
the target the patch's normalised pixels, each patch normalised by its own mean and variance (`norm_pix_loss`).
No momentum networks. The ViT has MAE's fixed sin-cos table (the column's half first), MAE's initialisation and
a trained patch projection (configs/mae_*.yaml).

The noise of step t comes from (run seed, t) for the global batch, each rank taking its images' rows: the same
masks after a resume and whatever the number of ranks. Every image loses the same number of patches, so the mean
over one rank's removed patches, averaged over ranks, is the global mean: the official reduction, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config, check
from fastvit_ssl.data.augment import ViewAugment
from fastvit_ssl.methods.base import Method, register, weight_decay_groups
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.vit import Block, VisionTransformer, normalize_uint8, sincos_pos_embed
from fastvit_ssl.specs import ARCH_SPECS, encoder_flops


@dataclass
class MaeConfig:
    """The `mae:` section: masked patches reconstructed in pixels by a decoder, no momentum networks."""

    mask_ratio: float = 0.75  # the fraction of each image's patches the encoder never sees
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by its own mean and variance (the recipe's)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, patch * patch * 3], patches row-major, each (row, column, channel) as MAE's."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int) -> torch.Tensor:
    """patchify's inverse: [B, L, patch * patch * 3] -> [B, 3, H, W]."""
    B, L, _ = patches.shape
    grid = int(round(L**0.5))
    x = patches.reshape(B, grid, grid, patch, patch, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, 3, grid * patch, grid * patch)


def pixel_targets(images: torch.Tensor, patch: int, normalise: bool) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, patch * patch * 3]: the patches, each normalised by its own mean and unbiased
    variance (+ 1e-6) when `normalise` (norm_pix_loss)."""
    target = patchify(images if images.dtype == torch.float64 else images.float(), patch)  # fp64 stays fp64
    if not normalise:
        return target
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


class Decoder(nn.Module):
    """Encoded visible tokens -> every patch's pixels: a Linear to the decoder's width, the mask token at every
    removed patch, fixed sin-cos positions, blocks, LayerNorm, a Linear to patch * patch * 3 values."""

    def __init__(self, embed_dim: int, grid: int, patch: int, dim: int, depth: int, heads: int, attention: str):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(grid, dim, row_first=False), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, attention=attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * 3)
        for module in self.modules():  # MAE's: xavier-uniform Linears (q/k/v as one matrix), zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """x: [B, 1 + K, D] (class token, kept patches in shuffled order); restore: [B, L], the position of each
        patch in that order. -> [B, L, patch * patch * 3]."""
        x = self.embed(x)  # (B, 1 + K, dim)
        B, L = restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, L - x.shape[1] + 1, -1)], dim=1)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))  # (B, L, dim), row-major again
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed.to(x.dtype)
        return self.pred(self.norm(self.blocks(x)))[:, 1:]  # (B, L, patch * patch * 3)


class MaskedAutoencoder(nn.Module):
    """The trained part: the ViT on the visible patches, then the decoder."""

    def __init__(self, encoder: VisionTransformer, cfg: MaeConfig, attention: str = "auto"):
        super().__init__()
        patch = encoder.patch_embed.patch_size
        self.encoder = encoder
        self.decoder = Decoder(
            encoder.embed_dim, encoder.grid, patch, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, attention
        )

    def forward(self, images: torch.Tensor, keep: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.forward_visible(images, keep), restore)


def shuffles(noise: torch.Tensor, keep_count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's random masking from per-patch noise [B, L]: the patches of smallest noise are kept. -> (keep [B, K]
    indices in shuffled order, restore [B, L] each patch's place in that order, mask [B, L]: 1 removed)."""
    order = noise.argsort(dim=1)
    restore = order.argsort(dim=1)
    mask = (restore >= keep_count).float()
    return order[:, :keep_count], restore, mask


@register
class MAE(Method):
    """Args:
    encoder: the ViT (MAE's options: sincos_cols_first positions, xavier_joint init, trained patch projection).
    cfg: the `mae:` section.
    seed: the run's seed; step t's masks come from (seed, t).
    attention: the decoder's attention kernel (the encoder's is model.attention, the same value).
    """

    name, section, Config = "mae", "mae", MaeConfig
    model_keys = ("decoder_dim", "decoder_depth", "decoder_heads")
    backbone_name = "online.encoder"
    finetune_layer_decay = 0.75  # the official fine-tuning recipe's (ViT-B)
    recipe = "mae_vit_base.yaml"
    suite = (("vit_base", 128, 1.5),)

    def __init__(self, encoder: VisionTransformer, cfg: MaeConfig, seed: int = 0, attention: str = "auto"):
        super().__init__()
        self.online = MaskedAutoencoder(encoder, cfg, attention)
        self.cfg, self.seed = cfg, seed
        self.patch = encoder.patch_embed.patch_size
        self.keep_count = int(encoder.grid**2 * (1 - cfg.mask_ratio))  # the official len_keep

    @classmethod
    def build(cls, cfg: Config, ops) -> MAE:
        encoder = build_encoder(cfg, ops["patch_embed"])
        return cls(encoder, cfg.mae, cfg.run.seed, cfg.model.attention)

    @staticmethod
    def validate(cfg: Config) -> None:
        mae, spec = cfg.mae, ARCH_SPECS[cfg.model.arch]
        patches = (cfg.model.img_size // spec.patch_size) ** 2
        check(
            [
                (
                    1 <= int(patches * (1 - mae.mask_ratio)) < patches,
                    f"mae.mask_ratio={mae.mask_ratio} must keep 1 to {patches - 1} of the {patches} patches",
                ),
                (mae.decoder_dim > 0 and mae.decoder_depth > 0, "mae.decoder_dim and mae.decoder_depth must be > 0"),
                (
                    mae.decoder_heads > 0 and mae.decoder_dim % mae.decoder_heads == 0 and mae.decoder_dim % 4 == 0,
                    "mae.decoder_dim must be a multiple of 4 (its sin-cos table) and of mae.decoder_heads",
                ),
                (cfg.model.rel_pos_bias == "none", "MAE drops patches: use model.rel_pos_bias=none"),
                (not cfg.model.mask_token, "MAE's encoder never sees masked patches: set model.mask_token=false"),
                (not spec.conv_stem, "MAE drops patch embeddings: use an arch without the conv stem"),
            ]
        )

    @classmethod
    def views(cls, cfg: Config) -> list:
        """One view: random resized crop (bicubic) and flip, nothing else (the official main_pretrain.py)."""
        blank = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
        size, uint8 = cfg.model.img_size, cfg.data.uint8_views
        return [ViewAugment(size, cfg.data.min_scale, **blank, uint8=uint8, interpolation="bicubic")]

    @classmethod
    def finetuning_layout(cls, cfg: Config) -> dict:
        """The official fine-tuning: mean pooling of the patch tokens and its own norm (main_finetune.py's
        global_pool default)."""
        return {"global_pool": "avg"}

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        return ["mae.decoder_dim=128", "mae.decoder_depth=2", "mae.decoder_heads=4"] if arch == "vit_demo" else []

    @classmethod
    def step_flops(cls, cfg: Config, batch: int, keys: int) -> float:
        """The encoder on the class token and the kept patches (their projection only: the fused kernel embeds no
        other, the reference embeds all and counts ~2% more at the demo ViT), the decoder on all tokens, both
        forward and backward (x3)."""
        spec, mae = ARCH_SPECS[cfg.model.arch], cfg.mae
        patches = (cfg.model.img_size // spec.patch_size) ** 2
        kept = int(patches * (1 - mae.mask_ratio))
        encoder = encoder_flops(cfg.model.arch, cfg.model.img_size, batch, tokens=1 + kept)
        T, d, out = patches + 1, mae.decoder_dim, spec.patch_size**2 * 3
        decoder = (
            2 * batch * (T * spec.embed_dim * d + mae.decoder_depth * (12 * T * d * d + 2 * T * T * d) + T * d * out)
        )
        return 3 * (encoder + decoder)

    def prepare(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The view and its masking: step `step`'s noise for the global batch, this rank's rows of it."""
        images = normalize_uint8(views[0]) if views[0].dtype == torch.uint8 else views[0]
        B, rank, world = images.shape[0], distributed.rank(), distributed.world_size()
        generator = torch.Generator().manual_seed((self.seed << 32) + step)
        noise = torch.rand(world * B, self.online.encoder.grid**2, generator=generator)[rank * B : (rank + 1) * B]
        keep, restore, mask = (t.to(images.device, non_blocking=True) for t in shuffles(noise, self.keep_count))
        return {"images": images, "keep": keep, "restore": restore, "mask": mask}

    def online_inputs(self, batch) -> tuple:
        return batch["images"], batch["keep"], batch["restore"]

    def targets(self, batch) -> torch.Tensor:
        return pixel_targets(batch["images"], self.patch, self.cfg.norm_pix_loss)

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        per_patch = (outputs.to(targets.dtype) - targets).pow(2).mean(-1)  # (B, L), in fp32 (or fp64) at least
        return {"loss": (per_patch * batch["mask"]).sum() / batch["mask"].sum()}

    def param_groups(self) -> list[dict]:
        """As the official code (timm's add_weight_decay): no weight decay for biases and 1-D tensors."""
        return weight_decay_groups(self.online)

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, path: Path) -> bool:
        """Rows: image, what the encoder sees, the reconstruction (each patch de-normalised with the image's own
        patch statistics when norm_pix_loss), the reconstruction with the visible patches pasted back."""
        from fastvit_ssl.data.preview import plot_grid

        was_training = self.training
        self.eval()
        batch = self.prepare([images], step=0)
        predicted = self.online(*self.online_inputs(batch)).float()  # (B, L, p * p * 3)
        self.train(was_training)
        patches = patchify(images.float(), self.patch)
        if self.cfg.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            predicted = predicted * (var + 1e-6) ** 0.5 + mean
        removed = batch["mask"][..., None]  # (B, L, 1)
        rows = {
            "image": images,
            "visible": unpatchify(patches * (1 - removed), self.patch),
            "reconstruction": unpatchify(predicted, self.patch),
            "with visible": unpatchify(patches * (1 - removed) + predicted * removed, self.patch),
        }
        plot_grid({k: list(v.cpu()) for k, v in rows.items()}, path, by_rows=True)
        return True
