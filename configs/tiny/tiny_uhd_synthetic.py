# A tiny LLaVA-UHD on the synthetic set: the tiny LLaVA's ViT shape (64 px, 3 layers, width 128) with
# patch 16, and each 256 px image cut into 4x4 slices of 64 px, i.e. seen at its native resolution
# where the fine-detail pattern lives, plus a 64 px overview; the resampler turns each of the 17 units'
# 16 patch tokens into 4 (2x2 queries): 68 visual tokens (+ 16 separator ids), against the tiny
# LLaVA's 64.
_base_ = ['./tiny_llava_synthetic.py']

# patch 16, not the tiny LLaVA's 8: the 17 units of a 32-image batch are 544 ViT inputs, and at 16
# patches each instead of 64 a step costs a quarter (0.66 s against 3.0 s on one CPU thread), which
# is what makes a 3000-step schedule fit a CPU
vision_encoder = dict(config=dict(patch_size=16))
# separators: the synthetic word-level vocabulary has no newline token; ',' between the slices
# of a row and '.' after a row's last slice play the release's ',' / '\n' (ids, as there)
image_processor = dict(_delete_=True, type='UHDImageProcessor', base=64, patch=16, max_slices=16,
                       separators=(',', '.'))
model = dict(projector=dict(type='Resampler', num_queries=4, embed_dim=128, num_heads=4))

# schedule: the tiny ConvLLaVA's (docs/convllava.md): 3000 steps, the random-init encoder and
# projector at 3x the LLM's lr. At 600 steps and 1x (patch 8) the ViT had not learned to read the
# pattern (fine_detail 0.28, chance); with this schedule it reads it (docs/uhd.md)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'vision_encoder': dict(lr_mult=3.0),
                                                     'projector': dict(lr_mult=3.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=3e-5, by_epoch=False, begin=50, end=3000),
]
train_cfg = dict(max_iters=3000)
