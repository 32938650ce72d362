"""Exported weights in timm itself (timm imports torchvision, which does not import beside the CPU torch used here:
this runs where timm works, e.g. in benchmarks/gpu_suite.sh)."""

import pytest
import torch

from fastvit_ssl.eval import export
from fastvit_ssl.models.vit import VisionTransformer

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("arch, pool", [("vit_small", "token"), ("vit_demo", "avg"), ("vit_demo", "avg_normed")])
def test_timm_builds_and_loads_the_export_strictly_with_the_same_features(arch, pool):
    torch.manual_seed(0)
    size = 28 if arch == "vit_demo" else 32
    ours = VisionTransformer(arch, size, global_pool=pool).eval()
    spec = export.timm_spec(ours)
    theirs = timm.create_model(spec["timm_model"], pretrained=False, **spec["timm_kwargs"]).eval()
    theirs.load_state_dict(export.to_timm_state_dict(ours), strict=True)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    # fp64: two implementations of one network agree to ~1e-14; a misplaced weight changes the features by O(1)
    torch.testing.assert_close(theirs.double()(x), ours.double()(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rel_pos_bias, pool", [("shared", "token"), ("per_block", "avg")])
def test_timm_beit_builds_and_loads_a_beit_export_with_the_same_features(rel_pos_bias, pool):
    torch.manual_seed(0)
    beit = dict(pos_embed="none", init="depth_scaled", rel_pos_bias=rel_pos_bias, layer_scale=0.1, qkv_bias="qv")
    ours = VisionTransformer("vit_demo", 28, global_pool=pool, **beit).eval()
    spec = export.timm_spec(ours)
    theirs = timm.create_model(spec["timm_model"], pretrained=False, **spec["timm_kwargs"]).eval()
    theirs.load_state_dict(export.to_timm_state_dict(ours), strict=True)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(theirs.double()(x), ours.double()(x), rtol=1e-10, atol=1e-10)  # fp64, as above
