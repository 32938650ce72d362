"""Vision Transformer as MoCo v3 trains it: fixed 2-D sin-cos position embedding, MoCo v3 initialisation,
optional random frozen patch projection, optional convolutional stem; with SiT's and BEiT's options (learned or no
absolute positions, DeiT/BEiT initialisation, a relative position bias shared by all blocks, LayerScale, q and v
biases only, a [MASK] token). Parameter names follow timm's `VisionTransformer` so that exported weights load there
unchanged."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, imagenet_stats
from fastvit_ssl.models.attention import attention_fn
from fastvit_ssl.specs import ARCH_SPECS, ArchSpec  # noqa: F401  (ArchSpec: tests add sizes)

log = logging.getLogger(__name__)


def sincos_pos_embed(grid: int, dim: int, temperature: float = 10000.0, row_first: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, [1, 1 + grid*grid, dim]; the first row (class token) is zero.

    The patch at row i, column j gets [sin(i w), cos(i w), sin(j w), cos(j w)] with dim/4 frequencies
    w_k = 1 / temperature^(k / (dim/4)), computed in fp32 as MoCo v3's vits.py does, so that the table equals the
    official one bit for bit (its meshgrid(grid_w, grid_h) puts the row first). row_first=False puts the column's
    half first: MAE's table (its numpy meshgrid(grid_w, grid_h) in "xy" order), and the one this project used
    before 2026-12-01 for every method.
    """
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    angle_row = rows.flatten()[:, None] * omega  # (L, dim/4)
    angle_col = cols.flatten()[:, None] * omega
    first, second = (angle_row, angle_col) if row_first else (angle_col, angle_row)
    table = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)  # (L, dim)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv), [B, C, H, W] -> [B, L, D]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, L, D)


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d computed in fp32 (or wider) and returned in the input's dtype, whatever the storage: under
    DeepSpeed's bf16 the weights are bf16 while the running statistics stay fp32, a mix torch's batch_norm refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum or 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        weight, bias = (self.weight.to(x32.dtype), self.bias.to(x32.dtype)) if self.affine else (None, None)
        batch_stats = self.training or not self.track_running_stats
        y = F.batch_norm(x32, self.running_mean, self.running_var, weight, bias, batch_stats, momentum, self.eps)
        return y.to(x.dtype)


class ConvStem(nn.Module):
    """Four 3x3 stride-2 convs with BN + ReLU (16x down-sampling), then a 1x1 conv to embed_dim."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size != 16 or embed_dim % 8:
            raise ValueError("the conv stem needs patch_size 16 and an embed_dim divisible by 8")
        self.img_size, self.patch_size = img_size, patch_size
        layers, width_in, width = [], in_chans, embed_dim // 8
        for _ in range(4):
            layers += [
                nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False),
                Fp32BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias, [1, heads, T, T] added to the attention logits: one learned value per head
    for each (row, column) offset between two patches, and three more for class token -> patch, patch -> class
    token and class token -> itself. Zero at the start."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        offsets = (2 * grid - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(offsets + 3, num_heads))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()  # (L,) each
        pairs = (rows[:, None] - rows[None, :] + grid - 1) * (2 * grid - 1) + (cols[:, None] - cols[None, :] + grid - 1)
        index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)  # (T, T)
        index[1:, 1:] = pairs
        index[0, :], index[:, 0], index[0, 0] = offsets, offsets + 1, offsets + 2
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention. qkv_bias: "all" (a bias on q, k and v) or "qv" (BEiT: learned biases on q and v
    only, k's is zero). backend: the kernel (models/attention.py; "auto": torch's SDPA). `bias` in forward: an
    additive [1, heads, T, T] logit bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: str = "all", backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.attend = num_heads, attention_fn(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "all")
        if qkv_bias == "qv":
            self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor:
        """The bias of the q, k, v projection: the Linear's, or [q_bias, 0, v_bias]."""
        if self.qkv.bias is not None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x) if self.qkv.bias is not None else F.linear(x, self.qkv.weight, self.qkv_bias())
        qkv = qkv.reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        x = self.attend(q, k, v, bias)  # (B, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT; BEiT's gamma), initialised to a small constant."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def trunc_normal_within_std_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BEiT's initialisation: N(0, std) truncated at +-std (its modeling code passes a=-std, b=std to timm's
    trunc_normal_, whose bounds are absolute), an effective standard deviation of 0.54 std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 (u / 255 - mean) / std, the pipelines' normalisation."""
    mean, std = imagenet_stats(images.device)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        qkv_bias: str = "all",
        layer_scale: float = 0.0,
        rel_pos_grid: int = 0,
        attention: str = "auto",
    ):
        super().__init__()
        # BEiT fine-tuning: this block's own relative position bias (over a rel_pos_grid^2 patch grid); 0: none
        self.rel_pos_bias = RelativePositionBias(rel_pos_grid, num_heads) if rel_pos_grid else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attention)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path_rate = drop_path_rate  # fine-tuning (and SiT, BEiT); MoCo v3 pre-trains without

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), bias)), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


def compile_blocks(model: nn.Module, mode: str = "default") -> None:
    """torch.compile every transformer block of `model` in place (parameter names unchanged), in torch.compile's
    `mode`. The blocks' element-wise work (LayerNorm, GELU, bias and residual adds) fuses into few kernels, forward
    and backward, the momentum encoder's too; patch embedding and heads, with their own fused kernels, stay as they
    are. Blocks of one shape share their compiled code."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(mode=mode)


def begin_graph_step() -> None:
    """Tell CUDA graphs (blocks compiled in reduce-overhead or max-autotune mode) that a new step begins: what the
    last step's graphs returned may then be overwritten, and no sooner. Without it each compiled block call would
    count as a new step (they are top-level compiled calls), and a no-grad pass (a momentum encoder, an evaluation)
    would overwrite a block's output before the next block had read it. Only once something was compiled: the
    first call imports the compiler (seconds), which an eager run never needs."""
    if "torch._inductor" in sys.modules:
        torch.compiler.cudagraph_mark_step_begin()


class VisionTransformer(nn.Module):
    """ViT encoder returning one feature vector per image.

    Args:
        arch: a key of ARCH_SPECS (vit_small, vit_base, ...).
        img_size: square input resolution; a multiple of the arch's patch size.
        frozen_patch_embed: freeze the randomly initialised patch projection (MoCo v3's stability fix).
        global_pool: "token" returns the class token, "avg" the mean of the patch tokens (timm's fc_norm layout),
            "avg_normed" the mean of the final-normed patch tokens (timm: avg with fc_norm=False; BEiT
            pre-training, whose LM head reads every normed token).
        in_chans: input channels.
        patch_embed_fn: a fused replacement of projection + class token + position embedding with
            fastvit_ssl.kernels.patch_embed's signature, or None for the modules' own computation.
        grad_checkpointing: recompute each block's activations in the backward pass (less memory, ~30% more time).
        drop_path_rate: stochastic depth of the last block (linearly less before it), for fine-tuning.
        pos_embed: "sincos" (fixed 2-D table, MoCo v3), "sincos_cols_first" (the same with the column's half first,
            MAE), "learned" (truncated normal 0.02, DeiT and SiT) or "none" (BEiT, whose positions come from the
            relative position bias; the table stays, zero and frozen).
        init: "xavier" (MoCo v3's: q/k/v as three matrices), "trunc_normal" (DeiT/SiT: every Linear N(0, 0.02)
            truncated at +-2, class token too; the patch convolution keeps PyTorch's default) or "depth_scaled"
            (BEiT's: N(0, 0.02) truncated at +-0.02 for every Linear, the patch convolution, class and [MASK]
            tokens; zero biases; block l's attn.proj and mlp.fc2 weights divided by sqrt(2 l)) or "xavier_joint"
            (MAE's, after the JAX ViT: every Linear xavier-uniform as one matrix, q/k/v's [3D, D] included, the
            patch projection as the unrolled matrix, class token N(0, 0.02), zero biases).
        num_heads: attention heads; 0 takes the arch's.
        rel_pos_bias: "none", "shared" (one relative position bias for all blocks: BEiT pre-training) or
            "per_block" (one each: BEiT fine-tuning, which starts every block from the shared one).
        layer_scale: LayerScale's initial value on both residual branches (BEiT: 0.1 for ViT-B, 1e-5 for ViT-L); 0
            for none.
        qkv_bias: "all" or "qv" (BEiT).
        mask_token: a learned [MASK] embedding that replaces the patch embeddings `forward_tokens(mask=...)` names
            (BEiT), before the positions are added.
        attention: the attention kernel (models/attention.py's BACKENDS).
    """

    def __init__(
        self,
        arch: str = "vit_base",
        img_size: int = 224,
        frozen_patch_embed: bool = True,
        global_pool: str = "token",
        in_chans: int = 3,
        patch_embed_fn: Callable | None = None,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        pos_embed: str = "sincos",
        init: str = "xavier",
        num_heads: int = 0,
        rel_pos_bias: str = "none",
        layer_scale: float = 0.0,
        qkv_bias: str = "all",
        mask_token: bool = False,
        attention: str = "auto",
    ):
        super().__init__()
        spec = ARCH_SPECS[arch]
        if img_size % spec.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of {arch}'s patch size {spec.patch_size}")
        self.arch, self.global_pool, self.embed_dim = arch, global_pool, spec.embed_dim
        stem = ConvStem if spec.conv_stem else PatchEmbed
        self.patch_embed = stem(img_size, spec.patch_size, in_chans, spec.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.grid = grid = img_size // spec.patch_size  # patches per side
        table = sincos_pos_embed(grid, spec.embed_dim, row_first=pos_embed != "sincos_cols_first")  # (1, 1 + L, D)
        self.pos_embed_kind = pos_embed
        self.pos_embed = nn.Parameter(table if pos_embed.startswith("sincos") else torch.zeros_like(table))
        self.pos_embed.requires_grad_(pos_embed == "learned")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim)) if mask_token else None
        rates = [drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]  # deeper: dropped more
        heads = num_heads or spec.num_heads
        self.rel_pos_bias = RelativePositionBias(grid, heads) if rel_pos_bias == "shared" else None
        own = grid if rel_pos_bias == "per_block" else 0
        self.blocks = nn.Sequential(
            *[Block(spec.embed_dim, heads, 4.0, r, qkv_bias, layer_scale, own, attention) for r in rates]
        )
        pooled_norm = nn.LayerNorm(spec.embed_dim, eps=1e-6)
        self.norm = pooled_norm if global_pool in ("token", "avg_normed") else nn.Identity()
        self.fc_norm = pooled_norm if global_pool == "avg" else nn.Identity()
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed_fn = patch_embed_fn if isinstance(self.patch_embed, PatchEmbed) else None
        if init in ("trunc_normal", "depth_scaled"):
            self._init_trunc_normal(depth_scaled=init == "depth_scaled")
        else:
            self._init_weights(joint_qkv=init == "xavier_joint")
        if pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        if isinstance(self.patch_embed, PatchEmbed):
            freeze = frozen_patch_embed and not spec.conv_stem
            self.patch_embed.proj.requires_grad_(not freeze)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        table = state_dict.get(prefix + "pos_embed")
        if self.pos_embed_kind == "sincos" and table is not None and not torch.equal(table, self.pos_embed.data):
            grid, dim = int(round((table.shape[1] - 1) ** 0.5)), table.shape[2]
            if torch.allclose(table.float().cpu(), sincos_pos_embed(grid, dim, row_first=False), atol=1e-5):
                log.warning(
                    "this checkpoint's fixed position table has its halves swapped against MoCo v3's official one "
                    "(made before 2026-12-01); it is kept, as the weights were trained with it. Runs started now "
                    "use the official table"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_trunc_normal(self, depth_scaled: bool = False) -> None:
        """DeiT/SiT: every Linear N(0, 0.02) truncated at +-2 (timm's absolute bounds: +-100 std, a plain normal),
        class (and [MASK]) token too, the patch convolution left at PyTorch's default. BEiT (its modeling code wraps
        trunc_normal_ with bounds +-std): truncated at +-1 std (effective std 0.0108), the patch convolution too
        with a zero bias, then block l's attn.proj and mlp.fc2 weights divided by sqrt(2 l)."""
        init = (
            trunc_normal_within_std_ if depth_scaled else functools.partial(nn.init.trunc_normal_, std=0.02, a=-2, b=2)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear) or (depth_scaled and isinstance(module, nn.Conv2d)):
                init(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init(self.cls_token)
        if self.mask_token is not None:
            init(self.mask_token)
        if depth_scaled:  # the residual branches' output projections shrink with depth
            with torch.no_grad():
                for layer, block in enumerate(self.blocks, start=1):
                    block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                    block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def _init_weights(self, joint_qkv: bool = False) -> None:
        """MoCo v3's xavier-uniform (class token N(0, 1e-6)), or MAE's (joint_qkv: q/k/v as one [3D, D] matrix, class
        token N(0, 0.02))."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("qkv") and not joint_qkv:  # q, k and v are three D x D matrices, each xavier
                    bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=0.02 if joint_qkv else 1e-6)
        if isinstance(self.patch_embed, PatchEmbed):
            proj = self.patch_embed.proj  # xavier over the unrolled (C * p * p) -> D matrix
            bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)

    def embed_tokens(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """-> [B, 1 + L, D]: patch projection, class token prepended, position embedding added; with `keep` ([B, K]
        patch indices) the class token and those patches only, [B, 1 + K, D] (the fused kernel embeds no other).

        images: [B, C, H, W] normalised float, or [B, H, W, C] uint8 as the loaders hand them over with
        data.uint8_views (normalised here with the pipelines' mean and std; inside the fused kernel when it is on).
        """
        uint8 = images.dtype == torch.uint8
        height, width = images.shape[1:3] if uint8 else images.shape[-2:]
        patch = self.patch_embed.patch_size
        if height != width or height % patch or (height != self.patch_embed.img_size and self.rel_pos_bias is not None):
            layout = "[B, H, W, C] uint8" if uint8 else "[B, C, H, W]"
            size = self.patch_embed.img_size
            raise ValueError(
                f"expected square images of a multiple of {patch} px ({size}x{size} with a relative position bias; "
                f"{layout}), got shape {tuple(images.shape)}"
            )
        positions = self.positions(height // patch)
        if self.patch_embed_fn is not None:
            proj = self.patch_embed.proj
            return self.patch_embed_fn(
                images,
                proj.weight,
                proj.bias,
                positions,
                self.patch_embed.patch_size,
                self.cls_token,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                keep=keep,
            )
        if uint8:
            images = normalize_uint8(images).to(self.cls_token.dtype)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + positions  # (B, 1 + L, D)
        if keep is None:
            return x
        return torch.cat([x[:, :1], x[:, 1:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], dim=1)

    def positions(self, grid: int) -> torch.Tensor:
        """The position table for a grid x grid patch image, [1, 1 + grid^2, D]: the model's own, or for another
        size (DINO's 96 px local crops) its patch rows resized bicubically as DINO's interpolate_pos_encoding does
        (the scale factor (grid + 0.1) / model grid, which torch's interpolate uses for the sampling positions)."""
        if grid == self.grid:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        scale = (grid + 0.1) / self.grid
        table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic")  # (1, D, grid, grid)
        return torch.cat([self.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)

    def forward_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (as embed_tokens takes them) -> [B, 1 + L, D] after all blocks (and the final norm for token
        pooling). mask: [B, L] bool, the patches whose embedding the [MASK] token replaces."""
        x = self.embed_tokens(images)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("forward_tokens: a mask needs a model built with mask_token=True")
            masked = self.mask_token.to(x.dtype) + self.pos_embed[:, 1:].to(x.dtype)  # (1, L, D)
            x = torch.cat([x[:, :1], torch.where(mask[..., None], masked, x[:, 1:])], dim=1)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (1, heads, T, T)
        return self.norm(self.run_blocks(x, bias))

    def run_blocks(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():  # keep block inputs only; recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return x

    def forward_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """MAE's encoder: only the patches `keep` names ([B, K] indices, row-major) go through the blocks.
        -> [B, 1 + K, D]: the class token, then the kept patches in `keep`'s order, after the final norm."""
        return self.norm(self.run_blocks(self.embed_tokens(images, keep)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(images)
        if self.global_pool in ("avg", "avg_normed"):
            return self.fc_norm(x[:, 1:].mean(dim=1))  # (B, D)
        return x[:, 0]  # (B, D)
