# LLaVA-UHD stage 1 (seed 003): only the resampler trains; CC-595K-style captions,
# lr 1e-3, global batch 256, 1 epoch, AdamW, cosine.
_base_ = [
    '../default_runtime.py',
    '../vision/clip_vit_l_336_uhd.py',
    '../datasets/llava_pretrain.py',
    '../schedules/llava15_pretrain.py',
]

model = dict(type='LLaVAModel', projector=dict(type='Resampler', num_queries=64),
             trainable=['projector'], gradient_checkpointing=True)
