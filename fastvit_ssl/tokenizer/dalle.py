"""The DALL-E dVAE encoder (Ramesh et al. 2021), the tokenizer of BEiT's paper: 8,192 visual tokens for each 8 x 8
pixel patch of a 112 px image (14 x 14 tokens), written here with the parameter names of OpenAI's released
`encoder.pkl`, so that its weights load unchanged from a safetensors file.

Nothing is downloaded. One-time conversion of the released pickle (it needs OpenAI's `dall-e` package and runs a
trusted pickle; fetch encoder.pkl from https://cdn.openai.com/dall-e/encoder.pkl yourself):

    pip install dall-e && python -m fastvit_ssl.tokenizer.dalle encoder.pkl dalle_encoder.safetensors

then `beit.tokenizer=dalle beit.tokenizer_path=dalle_encoder.safetensors`.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastvit_ssl.tokenizer.base import VisualTokenizer

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's pixel mapping: x -> (1 - 2 eps) x + eps


class Conv2d(nn.Module):
    """DALL-E's convolution: weight `w`, bias `b`, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1 / (n_in * kernel * kernel) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.w.shape[-1] - 1) // 2)


class EncoderBlock(nn.Module):
    """x -> id_path(x) + res_path(x) / layers^2, the residual path a bottleneck of four ReLU-conv pairs."""

    def __init__(self, n_in: int, n_out: int, layers: int):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, hidden, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(hidden, hidden, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(hidden, hidden, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(hidden, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """[B, 3, 8g, 8g] mapped pixels -> [B, vocab, g, g] logits: a 7x7 input conv, four groups of two blocks
    (widths 1, 2, 4, 8 x hidden; 2x2 max-pooling after the first three), ReLU and a 1x1 conv to the vocabulary."""

    def __init__(self, hidden: int = 256, blocks_per_group: int = 2, vocab_size: int = 8192):
        super().__init__()
        layers, widths = 4 * blocks_per_group, [hidden, 2 * hidden, 4 * hidden, 8 * hidden]
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(3, hidden, 7))]
        width_in = hidden
        for g, width in enumerate(widths, start=1):
            group = []
            for i in range(blocks_per_group):
                group.append((f"block_{i + 1}", EncoderBlock(width_in if i == 0 else width, width, layers)))
            if g < len(widths):
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width_in = width
        groups.append(
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width_in, vocab_size, 1))])))
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"beit.tokenizer_path={path}: no such file. The DALL-E tokenizer needs OpenAI's released encoder "
            "converted once to safetensors (see fastvit_ssl/tokenizer/dalle.py): pip install dall-e, download "
            "https://cdn.openai.com/dall-e/encoder.pkl, then python -m fastvit_ssl.tokenizer.dalle encoder.pkl "
            "dalle_encoder.safetensors"
        )
    from safetensors.torch import load_file

    return load_file(str(path))


class DalleTokenizer(VisualTokenizer):
    """BEiT's tokenizer: the DALL-E encoder's argmax token for each 8 x 8 patch of the view resized to 8 x grid."""

    def __init__(self, weights: str | Path | None, grid: int = 14):
        super().__init__()
        state = None if weights is None else read_weights(Path(weights))  # None: random (benchmarks: the cost)
        hidden = 256 if state is None else state["blocks.input.w"].shape[0]
        self.vocab_size = 8192 if state is None else state["blocks.output.conv.w"].shape[0]
        self.grid, self.image_size = grid, 8 * grid
        self.encoder = DalleEncoder(hidden=hidden, vocab_size=self.vocab_size)
        if state is not None:
            missing, unexpected = self.encoder.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{weights} is not a DALL-E encoder: missing {missing[:3]}..., unexpected {unexpected[:3]}..."
                )
        self.requires_grad_(False).eval()

    def map_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return (1 - 2 * LOGIT_LAPLACE_EPS) * pixels + LOGIT_LAPLACE_EPS

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)


def convert(pickle_path: Path, out: Path) -> None:
    """The released encoder.pkl (a pickled dall_e.Encoder: trusted code runs on load) -> safetensors."""
    from safetensors.torch import save_file

    encoder = torch.load(pickle_path, map_location="cpu", weights_only=False)
    save_file({k: v.float().contiguous() for k, v in encoder.state_dict().items()}, str(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert OpenAI's DALL-E encoder.pkl to safetensors (once).")
    parser.add_argument("pickle", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    convert(args.pickle, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
