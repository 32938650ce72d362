"""fastvit_ssl.viz: the class-token attention against a plain computation, both pictures from a checkpoint, and
unreadable --images skipped."""

import pytest
import torch

import train
from fastvit_ssl import cli, viz
from fastvit_ssl.models.vit import VisionTransformer


def test_class_attention_is_the_last_blocks_softmax_over_patches():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_demo", 28, rel_pos_bias="shared", qkv_bias="qv", pos_embed="none").eval()
    torch.nn.init.normal_(vit.rel_pos_bias.relative_position_bias_table)
    images = torch.randn(2, 3, 28, 28)
    maps = viz.class_attention(vit, images)  # (B, heads, 4, 4)
    x = vit.embed_tokens(images)
    for block in vit.blocks[:-1]:
        x = block(x, vit.rel_pos_bias())
    block = vit.blocks[-1]
    h = block.norm1(x)
    q = h @ block.attn.qkv.weight[:192].T + block.attn.q_bias
    k = h @ block.attn.qkv.weight[192:384].T
    q, k = q.view(2, 17, 3, 64), k.view(2, 17, 3, 64)
    logits = torch.einsum("bhd,bthd->bht", q[:, 0], k) / 8 + vit.rel_pos_bias()[:, :, 0]
    expected = logits.softmax(-1)[:, :, 1:].reshape(2, 3, 4, 4)
    torch.testing.assert_close(maps, expected)  # fp32, the same products in another grouping: a few ulps
    assert torch.all(maps.sum((-1, -2)) <= 1)  # the class token's share of its own attention is left out


def test_both_pictures_from_a_run(tiny_overrides, dataset_root, tmp_path):
    summary = train.main([*tiny_overrides, "run.stop_at_step=2"])
    run = summary["run_dir"]
    images = ["--images", str(dataset_root / "val")]
    out = viz.main(["attention", "--checkpoint", run, *images, "--out", str(tmp_path / "a.png")])
    assert out.stat().st_size > 5000
    out = viz.main(["neighbours", "--checkpoint", run, "--k", "3", "--out", str(tmp_path / "n.png")])
    assert out.stat().st_size > 5000


def test_unreadable_images_are_skipped_and_none_readable_is_a_user_error(
    tiny_overrides, dataset_root, tmp_path, caplog, capsys
):
    run = train.main([*tiny_overrides, "run.stop_at_step=1"])["run_dir"]
    good = sorted((dataset_root / "val").rglob("*.jpg"))[0]
    truncated, text = tmp_path / "truncated.jpg", tmp_path / "notes.txt"
    truncated.write_bytes(good.read_bytes()[:200])
    text.write_text("not an image")
    args = ["attention", "--checkpoint", run, "--out", str(tmp_path / "a.png"), "--images"]
    assert viz.main([*args, str(truncated), str(good), str(text)]).stat().st_size > 5000
    assert (
        f"skipping unreadable image {truncated}" in caplog.text and f"skipping unreadable image {text}" in caplog.text
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: viz.main([*args, str(truncated), str(text)]))
    assert stopped.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: --images: none of the 2 file(s) could be read as an image (each named above)\n"
    )
