# A tiny LLaVA-UHD on the synthetic set: the tiny LLaVA's towers, but the 256 px images are
# cut into up to 4 native-resolution 64 px slices plus an overview, each resampled to 16
# tokens (5 x 16 = 80 visual tokens, against the tiny LLaVA's 64 at 64 px).
_base_ = ['./tiny_llava_synthetic.py']

image_processor = dict(_delete_=True, type='UHDImageProcessor', base=64, patch=8, max_slices=4)
model = dict(projector=dict(type='Resampler', num_queries=16, embed_dim=128, num_heads=4))
