# LLaVA-UHD stage 1 (seed 003): LLaVA-1.5's stage 1 (CC-595K-style captions, lr 1e-3,
# global batch 256, 1 epoch, AdamW, cosine) with native-resolution slices and the shared
# resampler, which is all that trains.
_base_ = ['./llava15_pretrain.py']

# at most 7 slices + an overview; tokens per slice = the resampler's queries. The release's
# slicing (slice_image_minicpm, max_slice_nums=7; docs/uhd.md), separators
# ',' / '\n' embedded as the Llama-2 ids 29892 / 13
image_processor = dict(_delete_=True, type='UHDImageProcessor', base=336, patch=14, max_slices=7)
# padding-free batches as every recipe; no token cache: slices lay out several image
# tensors per image, so the text is tokenised per sample (LLaVADataset.token_cache)
train_dataloader = dict(dataset=dict(token_cache=None))
model = dict(projector=dict(_delete_=True, type='Resampler', num_queries=64))
