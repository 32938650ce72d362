"""Train BEiT's small tokenizer (dvae.PatchVQ) on the images of a folder, before pre-training with
beit.tokenizer=trained (train.py does it for you when beit.tokenizer_path is empty: into the run folder).

    python -m fastvit_ssl.tokenizer.train --data ROOT --out tokenizer.safetensors --size 28 --patch 7

ROOT holds train/ with class sub-folders (labels unused), or images in sub-folders directly. Prints one line per
epoch: loss, codes in use (of the vocabulary) and images/s.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastvit_ssl.data.folder import scan_image_folder
from fastvit_ssl.data.torch_pipeline import EvalDataset
from fastvit_ssl.tokenizer.dvae import PatchVQ, PatchVQConfig

log = logging.getLogger(__name__)


def train_tokenizer(
    root: Path,
    out: Path,
    config: PatchVQConfig,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> PatchVQ:
    """Train on every image of `root`/train (or `root`), flipped at random; dead codes restart at random encoder
    outputs of the batch after every epoch. Writes `out` (safetensors) atomically and returns the tokenizer. The
    global random state is left as it was (a run that trains its tokenizer starts like one that loads it)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train(root, out, config, epochs, batch_size, lr, seed)


def _train(root: Path, out: Path, config: PatchVQConfig, epochs: int, batch_size: int, lr: float, seed: int):
    folder = root / "train" if (root / "train").is_dir() else root
    samples, _ = scan_image_folder(folder)
    loader = DataLoader(
        EvalDataset(samples, config.image_size),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(samples) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    tokenizer = PatchVQ(config)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=lr)
    rng = random.Random(seed)
    first = tokenizer.inputs(next(iter(loader))[0])
    restart_dead_codes(tokenizer, first, torch.zeros(config.vocab, dtype=torch.bool))  # codes start on the data
    for epoch in range(epochs):
        started, used, total = time.perf_counter(), torch.zeros(config.vocab, dtype=torch.bool), 0.0
        for images, _ in loader:
            pixels = tokenizer.inputs(images)  # (B, 3, S, S) in [0, 1]
            if rng.random() < 0.5:
                pixels = pixels.flip(-1)
            loss, tokens = tokenizer.loss(pixels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            used[tokens.unique()] = True
            total += loss.item() * len(images)
        restart_dead_codes(tokenizer, pixels, used)
        log.info(
            "tokenizer epoch %d/%d: loss %.4f, %d of %d codes used, %.0f img/s",
            epoch + 1,
            epochs,
            total / len(loader.dataset),
            int(used.sum()),
            config.vocab,
            len(loader.dataset) / (time.perf_counter() - started),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    tokenizer.save(partial)
    partial.replace(out)
    return tokenizer.requires_grad_(False).eval()


@torch.no_grad()
def restart_dead_codes(tokenizer: PatchVQ, pixels: torch.Tensor, used: torch.Tensor) -> None:
    """Codes no image chose this epoch move to encoder outputs of the last batch (with a little noise)."""
    dead = (~used).nonzero().squeeze(1)
    if len(dead):
        z = tokenizer.encoder(pixels).permute(0, 2, 3, 1).flatten(0, 2)  # (B g g, dim)
        pick = torch.randint(len(z), (len(dead),))
        tokenizer.codebook[dead] = z[pick] + 0.01 * torch.randn_like(z[pick])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--patch", type=int, default=7, help="= the ViT's patch size (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out.exists():
        parser.error(f"{args.out} exists: choose another --out or delete it")
    config = PatchVQConfig(image_size=args.size, patch=args.patch, vocab=args.vocab)
    train_tokenizer(args.data, args.out, config, args.epochs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
