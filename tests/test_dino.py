"""DINO: its loss, centre, head, interpolated positions, crops and schedules against re-derivations of the official
code (facebookresearch/dino main_dino.py, vision_transformer.py, utils.py), the frozen last layer, and the method
end to end (training, exact resume, wrong settings)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from fastvit_ssl.config import ConfigError, load
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.methods.dino import DINO, WeightNormLinear
from fastvit_ssl.methods.losses import prototype_cross_entropy_ref
from fastvit_ssl.models.vit import VisionTransformer
from fastvit_ssl.monitor import read_metrics
from fastvit_ssl.optim.build import build_optimizer
from fastvit_ssl.optim.schedules import Schedules

REPO = Path(__file__).resolve().parents[1]
DINO_VIT = ["model.pos_embed=learned", "model.init=trunc_normal", "model.frozen_patch_embed=false"]
DINO_TINY = ["method.name=dino", *DINO_VIT, "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]
DEMO_28 = ["model.arch=vit_demo", "model.img_size=28", "dino.local_size=14", "dino.local_crops=2"]


def tiny_dino(*extra):
    torch.manual_seed(0)
    return build_method(load(None, [*DINO_TINY, *DEMO_28, *extra]), REFERENCE_OPS)


def crops(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 28, 28, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 14, 14, generator=g) for _ in range(2)
    ]


def official_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp):
    """DINOLoss.forward of main_dino.py, re-derived (without its centre update)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def test_the_loss_is_dinos_and_the_centre_moves_after_it():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6 * 5, 37, generator=g, dtype=torch.float64), torch.randn(2 * 5, 37, generator=g)
    center = torch.randn(1, 37, generator=g, dtype=torch.float64)
    ours = prototype_cross_entropy_ref(student, teacher.double(), center, 0.1, 0.04)
    official = official_dino_loss(student, teacher.double(), center, 6, 0.1, 0.04)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)  # fp64, the same sums in another order
    method = tiny_dino().double()
    views = [v.double() for v in crops()]
    before = method.center.clone()
    batch = {**method.prepare(views, 0), "hparams": Schedules(load(None, [*DINO_TINY, *DEMO_28]), DINO, 1).at(0)}
    outputs, targets = method.online(*views), method.targets(batch)
    loss = method.losses(outputs, targets, batch)["loss"]
    expected = official_dino_loss(outputs, targets, before, 4, 0.1, 0.04)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # update_center: the teacher outputs' batch mean (all ranks), momentum 0.9, after the loss
    torch.testing.assert_close(method.center, before * 0.9 + targets.mean(0, keepdim=True) * 0.1, rtol=1e-12, atol=0)


def test_the_loss_parts_are_the_papers_signs_of_collapse():
    """The teacher targets' entropy and the student's KL divergence from them (DINO, section 5.3), re-derived with
    other formulas in fp64; they add up to the loss."""
    method = tiny_dino().double()
    views = [v.double() for v in crops()]
    center = torch.randn(1, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    method.center.copy_(center)
    batch = {**method.prepare(views, 0), "hparams": Schedules(load(None, [*DINO_TINY, *DEMO_28]), DINO, 1).at(0)}
    outputs, targets = method.online(*views), method.targets(batch)
    parts = method.losses(outputs, targets, batch)
    q = F.softmax((targets - center) / 0.04, dim=-1).chunk(2)  # each global crop's targets
    log_p = F.log_softmax(outputs / 0.1, dim=-1).chunk(4)  # each crop's student
    entropy = torch.cat([torch.distributions.Categorical(probs=qi).entropy() for qi in q]).mean()
    pairs = [F.kl_div(log_p[v], qi, reduction="batchmean") for i, qi in enumerate(q) for v in range(4) if v != i]
    torch.testing.assert_close(parts["loss/teacher_entropy"], entropy, rtol=1e-12, atol=0)
    # KL = loss - entropy: a difference of two O(ln 64) numbers, so its error is ~1e-16 of those, not of KL
    torch.testing.assert_close(parts["loss/kl"], torch.stack(pairs).mean(), rtol=0, atol=1e-12)
    assert parts["loss/kl"] > 0 and 0 < parts["loss/teacher_entropy"] < math.log(64)


def test_the_head_is_dinos():
    """The weight-normalised last layer equals torch's weight_norm on the same v and g (DINO's nn.utils.weight_norm);
    with norm_last_layer its gain stays 1 and untrained; the bottleneck is L2-normalised."""
    layer = WeightNormLinear(16, 10).double()
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    reference = torch.nn.Linear(16, 10, bias=False).double()
    reference.weight.data = layer.weight_v.data.clone()
    reference = torch.nn.utils.parametrizations.weight_norm(reference)
    reference.parametrizations.weight.original0.data = layer.weight_g.data.clone()
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)
    head = tiny_dino().online.head
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g, torch.ones(64, 1))
    assert tiny_dino("dino.norm_last_layer=false").online.head.last_layer.weight_g.requires_grad
    h = torch.randn(5, 192)
    torch.testing.assert_close(head(h), head.last_layer(F.normalize(head.mlp(h), dim=-1)))
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [32, 32, 16]


def test_the_head_with_batchnorm_is_dinos_use_bn_in_head():
    """dino.head_bn (the official --use_bn_in_head): BatchNorm before each hidden GELU, at the official head's layer
    indices (so its state dict's names), with statistics over every crop of the batch at once (the head sees the
    features of all crops together, as its MultiCropWrapper's head does)."""
    head = tiny_dino("dino.head_bn=true").online.head.double()
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "GELU", "Linear", "GlobalBatchNorm1d", "GELU", "Linear"]
    features = torch.randn(4 * 6, 192, dtype=torch.float64) * 3 + 1  # 6 crops of 4 images
    normed = head.mlp[:2](features)
    torch.testing.assert_close(normed.mean(0), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(normed.var(0, unbiased=False), torch.ones(32, dtype=torch.float64), rtol=1e-4, atol=0)


def official_interpolate_pos_encoding(pos_embed, patch, w, h):
    """vision_transformer.py's interpolate_pos_encoding, re-derived."""
    N, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    if (w // patch) * (h // patch) == N and w == h:
        return pos_embed
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    return torch.cat((pos_embed[:, 0].unsqueeze(0), patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


@pytest.mark.parametrize("side", [96, 112, 224])
def test_positions_of_other_sizes_are_dinos(side):
    vit = VisionTransformer("vit_small", 224, pos_embed="learned", init="trunc_normal").double()
    expected = official_interpolate_pos_encoding(vit.pos_embed, 16, side, side)
    assert torch.equal(vit.positions(side // 16), expected)  # the same calls on the same values
    assert vit(torch.randn(2, 3, side, side, dtype=torch.float64)).shape == (2, 384)


def test_crops_are_dinos():
    cfg = load(REPO / "configs" / "dino_vit_small.yaml")
    views = DINO.views(cfg)
    assert [(v.size, v.min_scale, v.max_scale) for v in views] == [(224, 0.4, 1.0)] * 2 + [(96, 0.05, 0.4)] * 8
    assert [(v.blur_prob, v.solarize_prob) for v in views] == [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 8
    assert {(v.jitter_prob, v.brightness, v.contrast, v.saturation, v.hue, v.grayscale_prob) for v in views} == {
        (0.8, 0.4, 0.4, 0.2, 0.1, 0.2)
    }
    assert {(v.flip_prob, v.interpolation) for v in views} == {(0.5, "bicubic")}


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0):
    """utils.py's cosine_scheduler, re-derived."""
    warmup = np.linspace(0, base_value, warmup_epochs * niter_per_ep) if warmup_epochs else np.array([])
    iters = np.arange(epochs * niter_per_ep - len(warmup))
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_schedules_are_dinos():
    cfg = load(REPO / "configs" / "dino_vit_small.yaml", ["data.batch_size=256"])  # peak lr = base_lr
    spe = 7
    s = Schedules(cfg, DINO, spe)
    np.testing.assert_allclose(s.lr, official_cosine_scheduler(5e-4, 1e-6, 300, spe, 10), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(s.weight_decay, official_cosine_scheduler(0.04, 0.4, 300, spe), rtol=1e-12)
    np.testing.assert_allclose(s.own["momentum"], official_cosine_scheduler(0.996, 1, 300, spe), rtol=1e-12)
    # DINOLoss's teacher_temp_schedule, indexed by the epoch
    per_epoch = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(300 - 30) * 0.07))
    assert np.array_equal(s.own["teacher_temp"], np.repeat(per_epoch, spe))
    assert np.array_equal(s.own["last_layer"], (np.arange(300 * spe) >= spe).astype(float))  # frozen: epoch 0


def test_the_last_layer_is_frozen_for_the_first_epoch():
    """cancel_gradients_last_layer: during the first epoch the last layer gets no gradient, so AdamW leaves it and
    its state alone; from the second epoch on it trains."""
    cfg = load(None, [*DINO_TINY, *DEMO_28, "dino.norm_last_layer=false", "optim.epochs=2", "optim.warmup_epochs=0"])
    torch.manual_seed(0)
    method = build_method(cfg, REFERENCE_OPS)
    engine = LocalEngine(method, build_optimizer(cfg.optim, method.param_groups()), torch.device("cpu"))
    schedules, last = Schedules(cfg, DINO, 2), list(method.online.head.last_layer.parameters())
    before = [p.detach().clone() for p in last]
    for step in range(2):  # epoch 0
        engine.step(crops(seed=step), step, schedules.at(step))
    assert all(torch.equal(p, b) for p, b in zip(last, before)) and all(p not in engine.optimizer.state for p in last)
    engine.step(crops(seed=2), 2, schedules.at(2))  # epoch 1
    assert all(not torch.equal(p, b) for p, b in zip(last, before))
    assert not torch.equal(method.online.head.mlp[0].weight, method.teacher_head.mlp[0].weight)  # the EMA lags


def test_dino_pretrains_and_resumes_exactly(tiny_overrides):
    overrides = [*tiny_overrides, *DINO_TINY, "model.img_size=28", "dino.local_size=14", "dino.local_crops=2"]
    whole = train.main([*overrides, "run.name=whole"])
    train.main([*overrides, "run.name=cut", "run.stop_at_step=3"])
    cut = train.main([*overrides, "run.name=cut"])

    def losses(summary):
        return [r["loss"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r]

    assert cut["steps"] == whole["steps"] and losses(cut) == losses(whole)  # bit for bit: centre and crops too
    assert all(math.isfinite(v) for v in losses(whole)) and "knn_top1_pretrained" in whole
    rows = [r for r in read_metrics(Path(whole["run_dir"]) / "metrics.jsonl") if "teacher_temp" in r]
    assert rows and {r["last_layer"] for r in rows} == {0.0, 1.0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("dino.local_size=20", "must be a multiple of vit_demo's patch 7"),
        ("dino.local_min_scale=0.5", "dino.local_min_scale <= dino.local_max_scale"),
        ("model.global_pool=avg", "use model.global_pool=token"),
        ("dino.student_temp=0", "must be > 0"),
    ],
)
def test_wrong_dino_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        load(None, [*DINO_TINY, *DEMO_28, override])
    assert message in str(error.value)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_pipelines_make_the_multi_crop_batch(dataset_root, backend):
    """Crops of two sizes from one image list, each pipeline: 2 global 28 px, 2 local 14 px views per image."""
    from fastvit_ssl.data.folder import scan_image_folder

    samples, _ = scan_image_folder(dataset_root / "train")
    views = DINO.views(load(None, [*DINO_TINY, *DEMO_28]))
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        from fastvit_ssl.data.dali import DaliViewLoader

        loader = DaliViewLoader(samples, views, 8, seed=0, num_threads=1, device=torch.device("cpu"))
    else:
        from fastvit_ssl.data.torch_pipeline import TorchViewLoader

        loader = TorchViewLoader(samples, views, 8, 0, 1, seed=0, num_workers=0)
    loader.start(0)
    batch = next(iter(loader)).views
    assert [tuple(v.shape) for v in batch] == [(8, 3, 28, 28)] * 2 + [(8, 3, 14, 14)] * 2
    assert not torch.equal(batch[2], batch[3])  # two draws of the local crop


def test_a_dino_run_exports_its_encoder(tiny_overrides, tmp_path):
    from test_mae import exported_features_match

    overrides = [*tiny_overrides, *DINO_TINY, "model.img_size=28", "dino.local_size=14", "run.stop_at_step=1"]
    exported_features_match(Path(train.main(overrides)["run_dir"]), tmp_path)
