"""BEiT's options for the tests' 14 px demo ViT (2 x 2 patches, 2 of them masked), shared by the tests that train it."""

BEIT_TINY = [
    "method.name=beit",
    "model.pos_embed=none",
    "model.init=depth_scaled",
    "model.rel_pos_bias=shared",
    "model.layer_scale=0.1",
    "model.qkv_bias=qv",
    "model.mask_token=true",
    "beit.mask_patches=2",
    "beit.mask_min_patches=1",
]
