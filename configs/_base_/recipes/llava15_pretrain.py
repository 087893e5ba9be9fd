# LLaVA-1.5 stage 1 (feature alignment) without an LLM: a recipe adds one `_base_/llms` file.
_base_ = [
    '../default_runtime.py',
    '../vision/clip_vit_l_336.py',
    '../datasets/llava_pretrain.py',
    '../schedules/llava15_pretrain.py',
]

# model: CLIP ViT-L/336 (frozen) -> mlp2x_gelu (trains) -> LLM (frozen)
model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),
             trainable=['projector'], gradient_checkpointing='auto',
             fused_elementwise=True)
