# LLaVA-UHD stage 2 (seed 003): LLaVA-1.5's stage 2 (656K instruction mix, lr 2e-5, global
# batch 128) with slices and the resampler; resampler + LLM train. The paper keeps the ViT
# frozen; to update it too: --cfg-options "model.trainable=['projector','llm','vision_encoder']".
_base_ = ['./llava15_finetune.py']

# the release's slicing (slice_image_minicpm, max_slice_nums=7; docs/uhd.md), separators
# ',' / '\n' embedded as the Llama-2 ids 29892 / 13
image_processor = dict(_delete_=True, type='UHDImageProcessor', base=336, patch=14, max_slices=7)
# padding-free batches as every recipe; no token cache: slices lay out several image
# tensors per image, so the text is tokenised per sample (LLaVADataset.token_cache)
train_dataloader = dict(dataset=dict(token_cache=None))
model = dict(projector=dict(_delete_=True, type='Resampler', num_queries=64))
