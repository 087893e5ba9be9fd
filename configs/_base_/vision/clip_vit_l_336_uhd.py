# LLaVA-UHD (seed 003): CLIP ViT-L/14-336 over native-resolution slices (position embedding
# interpolated per slice shape) plus a low-resolution overview; at most 6 slices
# (672x1008 inputs); each slice becomes 64 tokens through the shared resampler.
_base_ = ['./clip_vit_l_336.py']

image_processor = dict(_delete_=True, type='UHDImageProcessor', base=336, patch=14,
                       max_slices=6)  # tokens_per_unit: the resampler's num_queries
