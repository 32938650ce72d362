"""A small discrete VAE (VQ-VAE, van den Oord et al. 2017) trained on your own images: BEiT's tokenizer when the
DALL-E weights are not at hand or do not fit the data (28 px digits), and the one the demo and the tests use.

Each patch of the ViT's grid becomes one of `vocab` codes: a stride-`patch` convolution per patch, a 3x3 convolution
across neighbouring patches, 1x1 layers down to the code width, then the nearest code vector; the decoder maps codes
back to pixels (for pictures of what the tokens mean). Trained by `fastvit_ssl.tokenizer.train`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastvit_ssl.tokenizer.base import VisualTokenizer


@dataclass(frozen=True)
class PatchVQConfig:
    image_size: int = 28
    patch: int = 7
    vocab: int = 256
    hidden: int = 128
    dim: int = 32  # width of a code vector


class PatchVQ(VisualTokenizer):
    """Pixels in [0, 1] -> [B, vocab, g, g] negative squared distances to the codes (argmax = nearest code)."""

    def __init__(self, config: PatchVQConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch:
            raise ValueError(f"tokenizer: image_size {c.image_size} is not a multiple of patch {c.patch}")
        self.vocab_size, self.grid, self.image_size = c.vocab, c.image_size // c.patch, c.image_size
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c.hidden, c.patch, stride=c.patch),
            nn.GELU(),
            nn.Conv2d(c.hidden, c.hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c.hidden, c.dim, 1),
        )
        self.codebook = nn.Parameter(torch.randn(c.vocab, c.dim))
        self.decoder = nn.Sequential(
            nn.Conv2d(c.dim, c.hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c.hidden, c.hidden, 1),
            nn.GELU(),
            nn.ConvTranspose2d(c.hidden, 3, c.patch, stride=c.patch),
        )

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder outputs [B, dim, g, g] -> squared distances to every code [B, vocab, g, g]."""
        return ((z.unsqueeze(1) - self.codebook[None, :, :, None, None]) ** 2).sum(2)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return -self.distances(self.encoder(pixels))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, g * g] tokens -> [B, 3, image_size, image_size] pixels in [0, 1]."""
        codes = self.codebook[tokens].transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (B, dim, g, g)
        return self.decoder(codes).sigmoid()

    def loss(self, pixels: torch.Tensor, commitment: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction + codebook + commitment loss, the tokens [B, g * g]); the straight-through estimator
        passes the decoder's gradient to the encoder."""
        z = self.encoder(pixels)  # (B, dim, g, g)
        tokens = self.distances(z).argmin(1).flatten(1)
        q = self.codebook[tokens].transpose(1, 2).reshape_as(z)
        recon = self.decoder(z + (q - z).detach()).sigmoid()
        loss = F.mse_loss(recon, pixels) + F.mse_loss(q, z.detach()) + commitment * F.mse_loss(z, q.detach())
        return loss, tokens

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"patch_vq": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str | Path) -> PatchVQ:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "patch_vq" not in meta:
            raise ValueError(f"{path} is not a tokenizer written by fastvit_ssl.tokenizer.train")
        tokenizer = cls(PatchVQConfig(**json.loads(meta["patch_vq"])))
        tokenizer.load_state_dict(load_file(str(path)))
        return tokenizer.requires_grad_(False).eval()
