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

# schedule: 3000 steps (5x the tiny LLaVA's), and the encoder and projector, which start from
# random weights, at 3x the LLM's lr. The ConvNeXt has to learn to find and read the 32-px
# fine-detail patch, one pattern at a time: at 600 steps it has not started (0.29), at 1500 it
# had in some seeds (0.94) and not in others (0.34); at 3000, 0.95 / 0.61 / 0.99 / 1.00 over four
# seeds, against the tiny LLaVA's 0.25 (docs/convllava.md)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'vision_encoder': dict(lr_mult=3.0),
                                                     'projector': dict(lr_mult=3.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=3e-5, by_epoch=False, begin=50, end=3000),
]
train_cfg = dict(max_iters=3000)
