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
from pathlib import Path

import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config, ConfigError
from fastvit_ssl.data.augment import imagenet_stats
from fastvit_ssl.data.masking import BlockMasking, mask_rng, masked_positions
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.base import Method
from fastvit_ssl.methods.losses import linear_cross_entropy_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.vit import ARCH_SPECS, VisionTransformer, beit_trunc_normal_, normalize_uint8
from fastvit_ssl.tokenizer.base import VisualTokenizer

IGNORE = -100  # target of padding positions (images with fewer masked patches than the target count)


class LMHead(nn.Linear):
    """Linear(D, vocab) whose forward is its cross-entropy summed over the counted rows: the logits of all masked
    tokens never exist at once with the fused loss (kernels/linear_ce.py)."""

    def __init__(self, dim: int, vocab: int, loss_fn: Callable = linear_cross_entropy_ref):
        super().__init__(dim, vocab)
        self.loss_fn = loss_fn
        beit_trunc_normal_(self.weight)
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


class BEiT(Method):
    """Args:
    encoder: the ViT, built with BEiT's options (mask token, relative position bias, ...).
    tokenizer: the frozen visual tokenizer; its grid must be the ViT's patch grid.
    masking: the block masking of one image.
    seed: the run's seed; each step's masks come from (seed, step, image index).
    loss_fn: the LM head's loss, linear_cross_entropy_ref or the fused kernel.
    loss_reduction: "global" (the mean over the masked tokens of the global batch) or "per_rank" (each rank's own
        mean, averaged over ranks, as the official code with DDP).
    """

    backbone_name = "online.encoder"
    lr_warmup = "linspace"  # its cosine_scheduler: np.linspace(0, lr, warm-up iterations)
    picture_name = "masked_predictions.png"

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
        self.tokenizer = tokenizer.requires_grad_(False)
        self.masking, self.seed, self.loss_reduction = masking, seed, loss_reduction

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
        trained = [(n, p) for n, p in self.online.named_parameters() if p.requires_grad]
        exempt = ("cls_token", "pos_embed")
        plain = {id(p) for n, p in trained if p.ndim == 1 or n.endswith(".bias") or n.split(".")[-1] in exempt}
        return [
            {"params": [p for _, p in trained if id(p) not in plain], "decay": True},
            {"params": [p for _, p in trained if id(p) in plain], "decay": False},
        ]

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


def build_tokenizer(cfg: Config) -> VisualTokenizer:
    """The tokenizer of cfg.beit: DALL-E's from its weights file, or the trained one (trained first, by rank 0, into
    the run folder when beit.tokenizer_path is empty and none is there yet)."""
    from fastvit_ssl.data.build import resolve_root
    from fastvit_ssl.tokenizer.dalle import DalleTokenizer
    from fastvit_ssl.tokenizer.dvae import PatchVQ, PatchVQConfig
    from fastvit_ssl.tokenizer.train import train_tokenizer

    grid = cfg.model.img_size // ARCH_SPECS[cfg.model.arch].patch_size
    if cfg.beit.tokenizer == "dalle":
        if not Path(cfg.beit.tokenizer_path).is_file():
            raise ConfigError(
                f"beit.tokenizer=dalle needs beit.tokenizer_path=<DALL-E's encoder as safetensors>, got "
                f"{cfg.beit.tokenizer_path!r}: no such file. Convert OpenAI's released encoder.pkl once, as "
                "fastvit_ssl/tokenizer/dalle.py says, or use beit.tokenizer=trained"
            )
        return DalleTokenizer(cfg.beit.tokenizer_path, grid)
    path = Path(cfg.beit.tokenizer_path or Path(cfg.run.out_dir) / cfg.run.name / "tokenizer.safetensors")
    if not path.is_file():
        if cfg.beit.tokenizer_path:
            raise ConfigError(
                f"beit.tokenizer_path={path}: no such file; train one with python -m fastvit_ssl.tokenizer.train, "
                "or leave beit.tokenizer_path empty to have one trained into the run folder"
            )
        if distributed.is_main():
            patch = cfg.model.img_size // grid
            config = PatchVQConfig(image_size=cfg.model.img_size, patch=patch, vocab=cfg.beit.tokenizer_vocab)
            train_tokenizer(resolve_root(cfg), path, config, epochs=cfg.beit.tokenizer_epochs, seed=cfg.run.seed)
        distributed.barrier()
    return PatchVQ.load(path)


def build_beit(cfg: Config, ops: Ops = REFERENCE_OPS) -> BEiT:
    b = cfg.beit
    grid = cfg.model.img_size // ARCH_SPECS[cfg.model.arch].patch_size
    masking = BlockMasking((grid, grid), b.mask_patches, b.mask_min_patches, b.mask_min_aspect)
    encoder = build_encoder(cfg, ops, drop_path_rate=b.drop_path)
    return BEiT(encoder, build_tokenizer(cfg), masking, cfg.run.seed, ops.lm_head_loss, b.loss_reduction)
