# LLaVA-UHD stage 2 (seed 003): resampler + LLM on the 656K instruction mix, lr 2e-5,
# global batch 128. The paper keeps the ViT frozen; to update it as well:
# --cfg-options "model.trainable=['projector','llm','vision_encoder']".
_base_ = [
    '../default_runtime.py',
    '../vision/clip_vit_l_336_uhd.py',
    '../datasets/llava_finetune.py',
    '../schedules/llava15_finetune.py',
]

model = dict(type='LLaVAModel', projector=dict(type='Resampler', num_queries=64),
             trainable=['projector', 'llm'], gradient_checkpointing=True)
