# LLaVA-UHD stage 2 (seed 003): LLaVA-1.5's stage 2 (656K instruction mix, lr 2e-5, global
# batch 128) with slices and the resampler; resampler + LLM train. The paper keeps the ViT
# frozen; to update it too: --cfg-options "model.trainable=['projector','llm','vision_encoder']".
_base_ = ['./llava15_finetune.py']

image_processor = dict(_delete_=True, type='UHDImageProcessor', base=336, patch=14, max_slices=6)
model = dict(projector=dict(_delete_=True, type='Resampler', num_queries=64))
