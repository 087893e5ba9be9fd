# LLaVA-1.5 stage 1 (feature alignment), Vicuna-7B: only the projector trains.
_base_ = [
    '../_base_/default_runtime.py',
    '../_base_/llms/vicuna7b.py',
    '../_base_/vision/clip_vit_l_336.py',
    '../_base_/datasets/llava_pretrain.py',
    '../_base_/schedules/llava15_pretrain.py',
]

model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),  # mlp2x_gelu
             trainable=['projector'])
