# A tiny ConvLLaVA-style model for the demo: the tiny LLaVA with its 64-px ViT (8x8 = 64
# tokens) replaced by a 4-stage ConvNeXt at 256 px (stride 32 -> 8x8 = 64 tokens), so both see
# the image through the same number of visual tokens; everything random-init and trainable.
_base_ = ['./tiny_llava_synthetic.py']

# model: timm's convnext_atto block layout, shrunk to one block per stage, dims 16..128
vision_encoder = dict(
    _delete_=True,
    type='ConvNeXtEncoder',
    backend='timm',
    model_name='convnext_atto',
    model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
)
# data: the synthetic images' native 256 px, where the fine detail is legible
image_processor = dict(size=256, token_stride=32)

# schedule: 1500 steps, 2.5x the tiny LLaVA's. At 600 the ConvNeXt has not yet learned to find and
# read the 32-px fine-detail patch (fine_detail 0.29); at 1500 it does (0.52, docs/convllava.md)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=3e-5, by_epoch=False, begin=50, end=1500),
]
train_cfg = dict(max_iters=1500)
