"""MAE: its masking, token-dropping encoder, decoder, targets and loss against re-derivations of the official
formulas (facebookresearch/mae models_mae.py) in float64; its initialisation and position table; the method end
to end (training, exact resume, pictures, wrong settings)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from fastvit_ssl.config import ConfigError, load
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods import mae
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models.vit import VisionTransformer, sincos_pos_embed
from fastvit_ssl.monitor import read_metrics

MAE_VIT = ["model.pos_embed=sincos_cols_first", "model.init=xavier_joint", "model.frozen_patch_embed=false"]
MAE_TINY = ["method.name=mae", *MAE_VIT, "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]
DEMO_28 = ["model.arch=vit_demo", "model.img_size=28"]  # 4 x 4 patches of 7 px: 4 kept, 12 removed


def tiny_mae(*extra):
    torch.manual_seed(0)
    return build_method(load(None, [*MAE_TINY, *DEMO_28, "model.attention=explicit", *extra]), REFERENCE_OPS)


def official_random_masking(noise: torch.Tensor, len_keep: int):
    """models_mae.py's random_masking, re-derived: (ids_keep, ids_restore, mask)."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(noise.shape)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


def test_masking_is_the_official_per_sample_shuffle():
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    keep, restore, mask = mae.shuffles(noise, 4)
    ids_keep, ids_restore, official = official_random_masking(noise, 4)
    assert torch.equal(keep, ids_keep) and torch.equal(restore, ids_restore) and torch.equal(mask, official)
    assert (mask.sum(1) == 12).all()  # every image keeps the 4 patches of smallest noise
    assert torch.equal(keep.sort(1).values, noise.topk(4, dim=1, largest=False).indices.sort(1).values)


def test_masks_come_from_the_step_and_the_global_batch(monkeypatch):
    """The same masks after a resume; two ranks' halves are one process's batch."""
    method = tiny_mae()
    images = [torch.randn(6, 3, 28, 28)]
    whole = method.prepare(images, step=3)
    assert torch.equal(method.prepare(images, step=3)["keep"], whole["keep"])
    assert not torch.equal(method.prepare(images, step=4)["keep"], whole["keep"])
    monkeypatch.setattr(mae.distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(mae.distributed, "rank", lambda rank=rank: rank)
        half = method.prepare([images[0][3 * rank : 3 * rank + 3]], step=3)
        assert torch.equal(half["keep"], whole["keep"][3 * rank : 3 * rank + 3])


def test_the_encoder_sees_only_the_kept_patches():
    """forward_visible equals the full ViT with attention to the removed patches blocked (-inf logits), read at the
    class token and the kept patches: the removed ones cannot reach the kept ones by any other path."""
    encoder = VisionTransformer("vit_demo", 28, attention="explicit").double()
    images = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    keep, _, mask = mae.shuffles(torch.rand(3, 16), 4)
    blocked = torch.cat([torch.zeros(3, 1), mask], dim=1).bool()  # (B, 1 + L): True for removed tokens
    bias = torch.zeros(3, 1, 17, 17, dtype=torch.float64).masked_fill(blocked[:, None, None, :], -math.inf)
    full = encoder.norm(encoder.run_blocks(encoder.embed_tokens(images), bias))  # (B, 1 + L, D)
    seen = torch.cat([full[:, :1], full[:, 1:].gather(1, keep[..., None].expand(-1, -1, full.shape[-1]))], dim=1)
    torch.testing.assert_close(encoder.forward_visible(images, keep), seen, rtol=1e-12, atol=1e-12)  # fp64


def test_the_decoder_puts_each_token_back_at_its_patch():
    """Each kept patch's encoding lands at its own patch, the mask token everywhere else (a scatter here, the
    official gather by ids_restore in the module)."""
    method = tiny_mae().double()
    decoder = method.online.decoder
    encoded = torch.randn(3, 5, 192, dtype=torch.float64)  # class token + 4 kept
    keep, restore, _ = mae.shuffles(torch.rand(3, 16), 4)
    x = decoder.embed(encoded)
    tokens = decoder.mask_token.expand(3, 16, -1).clone()
    for b in range(3):
        tokens[b, keep[b]] = x[b, 1:]
    expected = decoder.pred(decoder.norm(decoder.blocks(torch.cat([x[:, :1], tokens], 1) + decoder.pos_embed)))
    torch.testing.assert_close(decoder(encoded, restore), expected[:, 1:], rtol=1e-12, atol=1e-12)


def test_targets_and_loss_are_the_officials():
    method = tiny_mae().double()
    images = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    batch = method.prepare([images], step=0)
    # models_mae.py's patchify: reshape to (N, 3, h, p, w, p), einsum nchpwq->nhwpqc, (N, h * w, p * p * 3)
    official = torch.einsum("nchpwq->nhwpqc", images.reshape(4, 3, 4, 7, 4, 7)).reshape(4, 16, 147)
    assert torch.equal(mae.patchify(images, 7), official) and torch.equal(mae.unpatchify(official, 7), images)
    mean, var = official.mean(-1, keepdim=True), official.var(-1, keepdim=True)
    target = (official - mean) / (var + 1.0e-6) ** 0.5
    targets = method.targets(batch)
    torch.testing.assert_close(targets, target, rtol=1e-12, atol=1e-12)
    pred = method.online(*method.online_inputs(batch))
    loss = method.losses(pred, targets, batch)["loss"]
    expected = (((pred - target) ** 2).mean(-1) * batch["mask"]).sum() / batch["mask"].sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in method.online.parameters() if p.requires_grad)


def official_sincos_table(dim: int, grid: int) -> np.ndarray:
    """util/pos_embed.py's get_2d_sincos_pos_embed(dim, grid, cls_token=True), re-derived in float64 numpy."""
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


def test_position_tables_are_maes():
    """Ours in fp32, the official in fp64 then cast: angles up to (grid - 1) = 13 rad carry fp32 rounding of
    13 x 2^-24 = 8e-7, sin and cos one more ulp: 2e-6 bounds it; a swapped half differs by O(1)."""
    method = tiny_mae()
    tables = [(sincos_pos_embed(14, 768, row_first=False), 768, 14), (method.online.decoder.pos_embed, 16, 4)]
    for table, dim, grid in tables:
        official = torch.from_numpy(official_sincos_table(dim, grid)).float()[None]
        torch.testing.assert_close(table.detach(), official, rtol=0, atol=2e-6)
    assert not method.online.encoder.pos_embed.requires_grad and not method.online.decoder.pos_embed.requires_grad


def test_initialisation_is_maes():
    torch.manual_seed(0)
    mae_vit = dict(frozen_patch_embed=False, pos_embed="sincos_cols_first", init="xavier_joint")
    encoder = VisionTransformer("vit_base", 32, **mae_vit)
    qkv = encoder.blocks[0].attn.qkv.weight  # (3D, D) as one xavier-uniform matrix: bound sqrt(6 / (D + 3D))
    bound = math.sqrt(6 / (768 + 3 * 768))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    proj = encoder.patch_embed.proj.weight  # xavier over the unrolled (3 p p) -> D matrix
    assert proj.abs().max() <= math.sqrt(6 / (3 * 16 * 16 + 768)) and encoder.patch_embed.proj.weight.requires_grad
    # 768 draws of N(0, 0.02) (seeded): the sample std's relative error is ~1 / sqrt(2 x 768) = 2.6%, so 10% is a
    # 3.9-sigma bound; the former init (1e-6) or a uniform one would miss it by far
    assert abs(encoder.cls_token.std().item() - 0.02) < 0.002
    groups = tiny_mae().param_groups()
    assert [g["wd_scale"] for g in groups] == [1.0, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])


def test_mae_pretrains_resumes_exactly_and_draws_reconstructions(tiny_overrides):
    overrides = [*tiny_overrides, *MAE_TINY, "model.img_size=28", "optim.base_lr=1e-3"]
    whole = train.main([*overrides, "run.name=whole"])
    train.main([*overrides, "run.name=cut", "run.stop_at_step=3"])
    cut = train.main([*overrides, "run.name=cut"])

    def losses(summary):
        return [r["loss"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r]

    assert cut["steps"] == whole["steps"] and losses(cut) == losses(whole)  # bit for bit: same masks, same RNG
    assert all(math.isfinite(v) for v in losses(whole))
    assert (Path(whole["run_dir"]) / "reconstructions.png").stat().st_size > 1000
    assert "knn_top1_pretrained" in whole


@pytest.mark.parametrize(
    "override, message",
    [
        ("mae.mask_ratio=1.0", "must keep 1 to 15 of the 16 patches"),
        ("mae.decoder_heads=3", "multiple of 4 (its sin-cos table) and of mae.decoder_heads"),
        ("model.rel_pos_bias=shared", "use model.rel_pos_bias=none"),
        ("model.mask_token=true", "set model.mask_token=false"),
    ],
)
def test_wrong_mae_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        load(None, [*MAE_TINY, *DEMO_28, override])
    assert message in str(error.value)


def exported_features_match(run_dir: Path, tmp_path: Path) -> None:
    """export writes the backbone in timm's layout; read back into a fresh ViT it gives the run's features (fp64)."""
    from safetensors.torch import load_file

    from fastvit_ssl.eval import export
    from fastvit_ssl.eval.encoder import load_encoder

    out = export.export(run_dir, tmp_path / "encoder.safetensors")
    encoder, cfg = load_encoder(run_dir)
    fresh = VisionTransformer(cfg.model.arch, cfg.model.img_size, pos_embed=cfg.model.pos_embed)
    export.from_timm_state_dict(fresh, load_file(str(out)))
    x = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, dtype=torch.float64)
    torch.testing.assert_close(fresh.double().eval()(x), encoder.double().eval()(x), rtol=1e-12, atol=1e-12)


def test_an_mae_run_exports_its_encoder(tiny_overrides, tmp_path):
    summary = train.main([*tiny_overrides, *MAE_TINY, "model.img_size=28", "run.stop_at_step=1"])
    exported_features_match(Path(summary["run_dir"]), tmp_path)
