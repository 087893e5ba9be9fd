# MG-LLaVA stage 1, pretraining (seed 002): the projector, the bbox projector and the Conv-Gate
# fusion train; both vision branches and the LLM are frozen. lr 1e-3, global batch 256, 1 epoch,
# warmup 0.03, cosine, wd 0. A recipe adds one `_base_/llms` file.
_base_ = [
    '../default_runtime.py',
    '../vision/mgllava_clip336_convnext768.py',
    '../datasets/llava_pretrain.py',
    '../schedules/llava15_pretrain.py',
]

model = dict(type='MGLLaVAModel',
             projector=dict(type='MLPProjector', depth=2),
             fusion=dict(type='ConvGateFusion'),
             bbox_projector=dict(type='MLPProjector', depth=2),
             box_pool_size=56,
             trainable=['projector', 'bbox_projector', 'fusion'],
             gradient_checkpointing='auto',
             fused_elementwise=True)

# data: object boxes per image (`mllm annotate-boxes`, format in data/README.md); at most
# `max_boxes` object tokens per image. template=None: the LLM's chat template, not `plain` —
# MG-LLaVA pretrains with the same XTuner chat template as it finetunes (docs/mgllava.md).
train_dataloader = dict(dataset=dict(box_file='data/llava_pretrain/boxes.json', max_boxes=100,
                                     template=None))

# runtime: the DeepSpeed config `mllm train` uses unless --deepspeed says otherwise
deepspeed = 'zero2'
