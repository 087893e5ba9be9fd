# MG-LLaVA stage 2, instruction tuning (seed 002): stage 1's parts plus the full LLM train;
# lr 2e-5, global batch 128, 1 epoch, length-grouped. Start it from the stage-1 checkpoint:
# `mllm train <recipe> --load-from work_dirs/<pretrain run>/iter_N.pth`.
_base_ = [
    '../default_runtime.py',
    '../vision/mgllava_clip336_convnext768.py',
    '../datasets/llava_finetune.py',
    '../schedules/llava15_finetune.py',
]

model = dict(type='MGLLaVAModel',
             projector=dict(type='MLPProjector', depth=2),
             fusion=dict(type='ConvGateFusion'),
             bbox_projector=dict(type='MLPProjector', depth=2),
             box_pool_size=56,
             trainable=['projector', 'bbox_projector', 'fusion', 'llm'],
             gradient_checkpointing='auto',
             fused_elementwise=True)

train_dataloader = dict(dataset=dict(box_file='data/llava_finetune/boxes.json', max_boxes=100))

load_from_required = 'the MG-LLaVA pretrain checkpoint (iter_N.pth of mgllava_<llm>_pretrain)'
deepspeed = 'zero2'
