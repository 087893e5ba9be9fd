# LLaVA-1.5 stage 2 (visual instruction tuning) without an LLM. Start it from the stage-1
# checkpoint: `mllm train <recipe> --load-from work_dirs/<pretrain run>/iter_N.pth`.
_base_ = [
    '../default_runtime.py',
    '../vision/clip_vit_l_336.py',
    '../datasets/llava_finetune.py',
    '../schedules/llava15_finetune.py',
]

model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),
             trainable=['projector', 'llm'], gradient_checkpointing='auto',
             fused_elementwise=True)
