"""The interface BEiT's method uses: what a tokenizer wants as input, how many tokens it knows, and its tokens."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from fastvit_ssl.data.augment import imagenet_stats


class VisualTokenizer(nn.Module):
    """Frozen; subclasses set `vocab_size`, `grid` (tokens per side) and `image_size` (the pixels it reads), and
    implement `encode` ([B, 3, image_size, image_size] in its own pixel mapping -> logits or distances)."""

    vocab_size: int
    grid: int
    image_size: int

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's views ([B, 3, S, S], normalised with the ImageNet mean and std) -> this tokenizer's input:
        resized to image_size (bicubic, antialiased) and mapped to its pixel range by `map_pixels`."""
        mean, std = imagenet_stats(images.device)
        images = images.to(torch.promote_types(images.dtype, torch.float32))  # bf16 views: fp32
        pixels = (images * std + mean).clamp(0, 1)  # (B, 3, S, S) in [0, 1]
        if pixels.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            pixels = nn.functional.interpolate(pixels, size, mode="bicubic", antialias=True).clamp(0, 1)
        return self.map_pixels(pixels)

    def map_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def digest(self) -> str:
        """SHA-256 of the weights (what a checkpoint remembers of its tokenizer)."""
        return state_digest(self.state_dict())

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's views -> [B, grid * grid] long tokens (row-major, as the ViT's patches)."""
        scores = self.encode(self.inputs(images))  # (B, vocab, grid, grid): higher is likelier
        return scores.argmax(1).flatten(1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by name: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
