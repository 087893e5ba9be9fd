# LLaVA-UHD stage 1 (seed 003): LLaVA-1.5's stage 1 (CC-595K-style captions, lr 1e-3,
# global batch 256, 1 epoch, AdamW, cosine) with native-resolution slices and the shared
# resampler, which is all that trains.
_base_ = ['./llava15_pretrain.py']

# at most 6 slices (672x1008 inputs) + an overview; tokens per slice = the resampler's queries
image_processor = dict(_delete_=True, type='UHDImageProcessor', base=336, patch=14, max_slices=6)
model = dict(projector=dict(_delete_=True, type='Resampler', num_queries=64))
