# A tiny LLaVA-UHD on the synthetic set: the tiny LLaVA's towers (64 px ViT, patch 8), but each
# 256 px image is cut into 4x4 slices of 64 px, i.e. seen at its native resolution where the
# fine-detail pattern lives, plus a 64 px overview; the resampler turns each of the 17 units into
# 4 tokens (2x2 queries): 68 visual tokens (+ 16 separator ids), against the tiny LLaVA's 64.
_base_ = ['./tiny_llava_synthetic.py']

# separators: the synthetic word-level vocabulary has no newline token; ',' between the slices
# of a row and '.' after a row's last slice play the release's ',' / '\n' (ids, as there)
image_processor = dict(_delete_=True, type='UHDImageProcessor', base=64, patch=8, max_slices=16,
                       separators=(',', '.'))
model = dict(projector=dict(type='Resampler', num_queries=4, embed_dim=128, num_heads=4))
