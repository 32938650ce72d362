"""BEiT: the ViT's BEiT options against plain re-derivations of their formulas, the tokenizers' interface, the
method end to end (training, pictures, exact resume, wrong settings)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from beit_overrides import BEIT_TINY

import train
from fastvit_ssl.checkpoint import IncompatibleCheckpoint
from fastvit_ssl.config import ConfigError, load
from fastvit_ssl.eval import export, finetune
from fastvit_ssl.eval.encoder import adapt_state, load_encoder
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.beit import IGNORE, LMHead
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.models.vit import Attention, Block, RelativePositionBias, VisionTransformer
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.tokenizer.dalle import DalleEncoder, DalleTokenizer
from fastvit_ssl.tokenizer.dvae import PatchVQ, PatchVQConfig

BEIT_VIT = dict(
    pos_embed="none", init="depth_scaled", rel_pos_bias="shared", layer_scale=0.1, qkv_bias="qv", mask_token=True
)
BEIT = [
    *BEIT_TINY,
    "model.frozen_patch_embed=false",
    "model.global_pool=avg_normed",
    "beit.tokenizer_vocab=16",
    "beit.tokenizer_epochs=1",
]


def test_relative_position_bias_is_the_table_at_each_pair_offset():
    grid, heads = 3, 2
    rpb = RelativePositionBias(grid, heads)
    torch.nn.init.normal_(rpb.relative_position_bias_table)
    table, bias = rpb.relative_position_bias_table, rpb()[0]  # (offsets + 3, heads), (heads, T, T)
    offsets = (2 * grid - 1) ** 2
    for i in range(grid * grid):
        for j in range(grid * grid):
            (ri, ci), (rj, cj) = divmod(i, grid), divmod(j, grid)
            row = (ri - rj + grid - 1) * (2 * grid - 1) + (ci - cj + grid - 1)
            assert torch.equal(bias[:, 1 + i, 1 + j], table[row])
    assert torch.equal(bias[:, 0, 1:], table[offsets][:, None].expand(-1, grid * grid))  # class token -> patches
    assert torch.equal(bias[:, 1:, 0], table[offsets + 1][:, None].expand(-1, grid * grid))  # patches -> class
    assert torch.equal(bias[:, 0, 0], table[offsets + 2])


def test_attention_with_qv_biases_and_a_logit_bias_is_the_formula():
    torch.manual_seed(0)
    attn = Attention(8, 2, qkv_bias="qv")
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x, bias = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 5, dtype=torch.float64)
    attn.double()
    w = attn.qkv.weight
    q, k, v = x @ w[:8].T + attn.q_bias, x @ w[8:16].T, x @ w[16:].T + attn.v_bias  # k has no bias
    heads = [t.view(3, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]  # (B, heads, T, 4)
    weights = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(4) + bias, dim=-1)
    expected = attn.proj((weights @ heads[2]).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x, bias), expected)  # fp64, the same formula: default 1e-7


def test_layer_scale_scales_both_residual_branches():
    torch.manual_seed(0)
    block = Block(8, 2, layer_scale=0.1).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = x + 0.1 * block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + 0.1 * block.mlp(block.norm2(h)))  # fp64: default 1e-7
    assert torch.equal(block.ls1.gamma, torch.full((8,), 0.1))


def test_mask_token_replaces_masked_patch_embeddings():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_demo", 28, frozen_patch_embed=False, **BEIT_VIT)
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    images, mask = torch.randn(2, 3, 28, 28), torch.rand(2, 16) < 0.4
    vit.forward_tokens(images, mask)
    x, plain = seen["x"], vit.embed_tokens(images)
    assert torch.equal(x[:, 1:][mask], vit.mask_token[0].expand(int(mask.sum()), -1))
    assert torch.equal(x[:, 1:][~mask], plain[:, 1:][~mask]) and torch.equal(x[:, 0], plain[:, 0])


def test_beit_init_is_the_official_truncation_at_one_std():
    """The official modeling code calls timm's trunc_normal_(std=0.02, a=-std, b=std): N(0, 0.02) cut at +-0.02,
    whose standard deviation is 0.02 sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.0108 and kurtosis ~1.9 (3 for a
    normal); every Linear, the patch convolution (bias 0), class and [MASK] tokens, then attn.proj and mlp.fc2 of
    block l divided by sqrt(2 l)."""
    phi, Phi = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    var = 1 - 2 * phi / (2 * Phi - 1)  # of N(0, 1) cut at +-1 (by parts: E z^2 = 1 - 2 a phi(a) / Z at a = 1)
    fourth = 3 * var - 2 * phi / (2 * Phi - 1)  # E z^4 = 3 E z^2 - 2 a^3 phi(a) / Z
    unit_std, unit_kurtosis = math.sqrt(var), fourth / var**2
    torch.manual_seed(0)
    vit = VisionTransformer("vit_small", 224, frozen_patch_embed=False, **BEIT_VIT)

    def check(t: torch.Tensor, std: float, name: str) -> None:
        t = t.detach().flatten().double()
        # the sample std of n values has a relative standard error ~1 / sqrt(2n) (0.2% for 384 x 384): 2% is > 5x
        assert t.std().item() == pytest.approx(std * unit_std, rel=0.02), name
        assert t.abs().max().item() <= std * (1 + 1e-6), name
        kurtosis = (t**4).mean().item() / t.var().item() ** 2
        assert kurtosis == pytest.approx(unit_kurtosis, rel=0.05), name  # ~1.9

    for layer in (1, 12):
        block = vit.blocks[layer - 1]
        check(block.attn.proj.weight, 0.02 / math.sqrt(2 * layer), f"block {layer} attn.proj")
        check(block.mlp.fc2.weight, 0.02 / math.sqrt(2 * layer), f"block {layer} mlp.fc2")
        check(block.mlp.fc1.weight, 0.02, f"block {layer} mlp.fc1")
        assert torch.all(block.mlp.fc1.bias == 0)
    check(vit.patch_embed.proj.weight, 0.02, "patch projection")
    assert torch.all(vit.patch_embed.proj.bias == 0)
    assert vit.cls_token.abs().max() <= 0.02 and vit.mask_token.abs().max() <= 0.02
    head = LMHead(384, 8192)
    check(head.weight, 0.02, "LM head")
    assert torch.all(head.bias == 0)
    assert unit_std == pytest.approx(0.5396, abs=1e-4) and unit_kurtosis == pytest.approx(1.94, abs=0.01)
    assert not vit.pos_embed.requires_grad and vit.pos_embed.abs().sum() == 0


def test_trained_tokenizer_interface(tmp_path):
    tokenizer = PatchVQ(PatchVQConfig(image_size=28, patch=7, vocab=32))
    images = torch.randn(3, 3, 28, 28, requires_grad=True)
    tokens = tokenizer.tokenize(images)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long and not tokens.requires_grad
    assert tokens.min() >= 0 and tokens.max() < 32
    assert tokenizer.decode(tokens).shape == (3, 3, 28, 28)
    tokenizer.save(tmp_path / "t.safetensors")
    assert torch.equal(PatchVQ.load(tmp_path / "t.safetensors").tokenize(images), tokens)


def test_dalle_tokenizer_loads_a_weights_file_with_the_released_names(tmp_path):
    from safetensors.torch import save_file

    encoder = DalleEncoder(hidden=16, vocab_size=64)  # the released one: hidden 256, 8,192 tokens
    names = set(encoder.state_dict())
    released = {"blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w"}
    assert released | {"blocks.group_4.block_2.res_path.conv_4.b", "blocks.output.conv.w"} <= names
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "dalle.safetensors"))
    tokenizer = DalleTokenizer(tmp_path / "dalle.safetensors", grid=2)
    assert tokenizer.image_size == 16 and tokenizer.vocab_size == 64
    pixels = tokenizer.inputs(torch.randn(2, 3, 28, 28))
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= 0.1 and pixels.max() <= 0.9  # DALL-E's mapping
    tokens = tokenizer.tokenize(torch.randn(2, 3, 28, 28))
    assert tokens.shape == (2, 4) and tokens.max() < 64
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        DalleTokenizer(tmp_path / "missing.safetensors")


def test_beit_trains_writes_its_pictures_and_resumes_exactly(tiny_overrides):
    full = train.main([*tiny_overrides, *BEIT, "run.name=beit-full"])
    run_dir = Path(full["run_dir"])
    assert full["steps"] == 6 and 0 <= full["knn_top1_pretrained"] <= 100
    assert (run_dir / "tokenizer.safetensors").is_file() and (run_dir / "masked_predictions.png").stat().st_size > 1000
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert all(0 < v < 2 * math.log(16) for v in losses.values())  # cross-entropy over 16 tokens
    cut = [*tiny_overrides, *BEIT, "run.name=beit-cut", "eval.knn_every_epochs=0"]
    cut.append(f"beit.tokenizer_path={run_dir / 'tokenizer.safetensors'}")
    assert train.main([*cut, "run.stop_at_step=4"])["steps"] == 4
    resumed = train.main(cut)
    metrics = read_metrics(Path(resumed["run_dir"]) / "metrics.jsonl")
    assert {r["step"]: r["loss"] for r in metrics if "loss" in r} == losses  # bit for bit, masks included

    # fine-tuning the checkpoint with BEiT's layout and layer decay, through the CLI
    common = ["--checkpoint", str(run_dir), "--epochs", "1", "--batch", "8", "--mixup", "0", "--cutmix", "0"]
    result = finetune.main(common)
    assert 0 <= result["finetune_top1"] <= 100
    encoder, cfg = load_encoder(run_dir, finetune.finetuning_layout)
    assert encoder.global_pool == "avg" and encoder.mask_token is None and encoder.rel_pos_bias is None


def test_finetuning_layout_copies_the_shared_bias_into_every_block():
    torch.manual_seed(0)
    pre = VisionTransformer("vit_demo", 28, global_pool="avg_normed", **BEIT_VIT)
    torch.nn.init.normal_(pre.rel_pos_bias.relative_position_bias_table)
    layout = {**BEIT_VIT, "rel_pos_bias": "per_block", "mask_token": False}
    fine = VisionTransformer("vit_demo", 28, global_pool="avg", **layout)
    torch.nn.init.normal_(pre.norm.weight), torch.nn.init.normal_(pre.norm.bias)  # a trained final norm
    fine.load_state_dict(adapt_state(pre.state_dict(), fine))
    for block in fine.blocks:
        assert torch.equal(
            block.rel_pos_bias.relative_position_bias_table, pre.rel_pos_bias.relative_position_bias_table
        )
    # BEiT's official fine-tuning loads by name: the final norm is dropped, mean pooling's norm starts fresh
    assert torch.equal(fine.fc_norm.weight, torch.ones(192)) and torch.equal(fine.fc_norm.bias, torch.zeros(192))
    kept = VisionTransformer("vit_demo", 28, global_pool="avg", **layout)
    kept.load_state_dict(adapt_state(pre.state_dict(), kept, pretrained_norm="fc_norm"))  # the option
    assert torch.equal(kept.fc_norm.weight, pre.norm.weight) and torch.equal(kept.fc_norm.bias, pre.norm.bias)
    outputs = {}
    for name, model in (("pre", pre), ("fine", fine)):
        model.blocks[-1].register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
        model.eval()(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    # the same network up to the pooling, the same ops in the same order: fp32 default (1.3e-6, 1e-5) is generous
    torch.testing.assert_close(outputs["fine"], outputs["pre"])


def test_prepare_masks_targets_and_padding():
    cfg = load(
        None, [*BEIT, "model.arch=vit_demo", "model.img_size=28", "beit.mask_patches=6", "beit.mask_min_patches=2"]
    )
    method = BEiT_with_random_tokenizer(cfg).eval()  # no drop path: two forwards agree
    views = [torch.randn(5, 3, 28, 28)]
    batch = method.prepare(views, step=3)
    assert batch["mask"].shape == (5, 16) and batch["positions"].shape == batch["targets"].shape == (5, 6)
    counted = batch["targets"] != IGNORE
    assert torch.equal(counted.sum(1), batch["mask"].sum(1))  # one target per masked patch, the rest padding
    assert torch.equal(method.prepare(views, step=3)["mask"], batch["mask"])
    assert not torch.equal(method.prepare(views, step=4)["mask"], batch["mask"])
    loss = method.losses(method.online(*method.online_inputs(batch)), batch["targets"], batch)["loss"]
    hidden = method.online.hidden(batch["images"], batch["mask"], batch["positions"])[counted]
    head = method.online.lm_head
    expected = F.cross_entropy(F.linear(hidden, head.weight, head.bias), batch["targets"][counted])
    torch.testing.assert_close(loss, expected)  # fp32, the same products summed in another grouping: a few ulps


def BEiT_with_random_tokenizer(cfg, seed=0):
    from unittest import mock

    torch.manual_seed(seed)
    tokenizer = PatchVQ(PatchVQConfig(image_size=28, patch=7, vocab=16))
    with mock.patch("fastvit_ssl.methods.beit.load_tokenizer", lambda cfg: tokenizer):
        return build_method(cfg, REFERENCE_OPS)


def test_checkpoints_hold_the_tokenizers_hash_not_its_weights():
    """The frozen tokenizer is not trained: a checkpoint names it by the SHA-256 of its weights and refuses to load
    into a run with another; checkpoints from before 2026-12-04 hold its weights, which are hashed and dropped."""
    cfg = load(None, [*BEIT, "model.arch=vit_demo", "model.img_size=28"])
    method, same, other = (BEiT_with_random_tokenizer(cfg, seed) for seed in (0, 0, 1))
    state = method.state_dict()
    assert not any(k.startswith("tokenizer.") for k in state) and state["tokenizer_digest"].shape == (32,)
    assert bytes(state["tokenizer_digest"].tolist()).hex() == method.tokenizer.digest()
    same.load_state_dict(state)
    with pytest.raises(IncompatibleCheckpoint, match="another visual tokenizer"):
        other.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "tokenizer_digest"}
    legacy |= {f"tokenizer.{k}": v for k, v in method.tokenizer.state_dict().items()}
    same.load_state_dict(legacy)
    with pytest.raises(IncompatibleCheckpoint, match="another visual tokenizer"):
        other.load_state_dict(legacy)


def test_wrong_beit_settings_are_refused():
    with pytest.raises(ConfigError, match="model.mask_token=true"):
        load(None, ["method.name=beit"])
    with pytest.raises(ConfigError, match="beit.tokenizer=dalle needs beit.tokenizer_path"):  # when loaded
        load(None, [*BEIT, "beit.tokenizer=dalle", "beit.mask_patches=75", "beit.mask_min_patches=16"])
    with pytest.raises(ConfigError, match="python -m fastvit_ssl.tokenizer.train"):
        load(None, [*BEIT, "beit.tokenizer_path=/nonexistent/t.safetensors"])
    with pytest.raises(ConfigError, match="beit.mask_patches must lie in 1..15"):
        load(None, [*BEIT, "model.arch=vit_demo", "model.img_size=28", "beit.mask_patches=20"])


def test_export_uses_timm_beit_names():
    vit = VisionTransformer("vit_demo", 28, global_pool="avg_normed", **BEIT_VIT)
    per_block = ["attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight", "attn.proj.bias", "gamma_1"]
    per_block += ["gamma_2", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight"]
    per_block += ["mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {f"blocks.{i}.{name}" for i in range(4) for name in per_block}
    expected |= {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    expected |= {"rel_pos_bias.relative_position_bias_table"}  # the index: timm builds it, non-persistent
    state = export.to_timm_state_dict(vit)
    assert set(state) == expected  # timm's Beit(use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values)
    assert torch.equal(state["blocks.2.gamma_1"], vit.blocks[2].ls1.gamma)
    kwargs = export.timm_spec(vit)["timm_kwargs"]
    assert kwargs["use_shared_rel_pos_bias"] and not kwargs["use_abs_pos_emb"] and kwargs["init_values"] > 0
    fine = VisionTransformer("vit_demo", 28, global_pool="avg", **{**BEIT_VIT, "rel_pos_bias": "per_block"})
    state = export.to_timm_state_dict(fine)
    assert "blocks.3.attn.relative_position_bias_table" in state
    assert "blocks.3.attn.relative_position_index" not in state
    assert "fc_norm.weight" in state and export.timm_spec(fine)["timm_kwargs"]["global_pool"] == "avg"


def test_beit_pretrains_with_the_dalle_tokenizer_from_a_weights_file(tiny_overrides, tmp_path):
    from safetensors.torch import save_file

    encoder = DalleEncoder(hidden=16, vocab_size=64)  # released names, random weights, small
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "dalle.safetensors"))
    dalle = ["beit.tokenizer=dalle", f"beit.tokenizer_path={tmp_path / 'dalle.safetensors'}", "run.name=beit-dalle"]
    summary = train.main([*tiny_overrides, *BEIT, *dalle])
    assert summary["steps"] == 6 and not (Path(summary["run_dir"]) / "tokenizer.safetensors").exists()
    losses = [r["loss"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(0 < v < 2 * math.log(64) for v in losses)
