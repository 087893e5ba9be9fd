# ConvLLaVA stage 3, instruction tuning (seed 000): projector + LLM on LLaVA-1.5's 665K mix,
# the whole encoder frozen. lr 2e-5, global batch 128, 1 epoch; ZeRO-2.
# Start from stage 2: `--load-from work_dirs/<stage-2 run>/iter_N.pth`.
_base_ = [
    '../default_runtime.py',
    '../datasets/llava_finetune.py',
    '../schedules/llava15_finetune.py',
]

model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),
             trainable=['projector', 'llm'], gradient_checkpointing='auto',
             fused_elementwise=True)
# schedule: global batch = 8 GPUs x 16 per GPU x 1 accumulation step (lr 2e-5 from the base)

deepspeed = 'zero2'
load_from_required = 'the ConvLLaVA stage-2 checkpoint (iter_N.pth of convllava_<llm>_<res>_stage2)'
