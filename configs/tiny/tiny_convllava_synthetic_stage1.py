# Tiny ConvLLaVA, stage 1 of 3 (CPU tests of the stage hand-over): the tiny ConvNeXt plus a
# random-init 5th stage (stride 64: 4x4 = 16 tokens at 256 px); stage 5 + projector train.
_base_ = ['./tiny_convllava_synthetic.py']

# model
vision_encoder = dict(extra_stage=dict(channels=256, depth=1))
image_processor = dict(token_stride=64)
model = dict(trainable=['vision_encoder.stage5', 'projector'])

# schedule: seed 000's stage-1 lr
optim_wrapper = dict(optimizer=dict(lr=3e-4), paramwise_cfg=None)  # one lr, as in the seed
