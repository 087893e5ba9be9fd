# ConvLLaVA stage 1, projector initialisation (seed 000): the random-init 5th stage and the
# projector train, everything else is frozen. lr 3e-4, global batch 256, 1 epoch, warmup
# 0.03, cosine, wd 0, AdamW; ZeRO-2. A recipe adds one `_base_/llms` and one
# `_base_/vision/convnext_large_convllava_<res>` file.
_base_ = [
    '../default_runtime.py',
    '../datasets/llava_pretrain.py',
    '../schedules/llava15_pretrain.py',
]

# data: the LLM's chat template (Vicuna: LLaVA's `vicuna_v1`), not `plain`: ConvLLaVA's
# scripts/stage_1.sh and stage_2.sh train with `--version v1` (docs/convllava.md)
train_dataloader = dict(dataset=dict(template=None))

# model: ConvNeXt-L (frozen) + stage 5 (trains) -> mlp2x_gelu 3072 -> H (trains) -> LLM (frozen)
model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),
             trainable=['vision_encoder.stage5', 'projector'], gradient_checkpointing='auto',
             fused_elementwise=True)

# schedule: global batch = 8 GPUs x 32 per GPU x 1 accumulation step
optim_wrapper = dict(optimizer=dict(lr=3e-4))

# runtime: the DeepSpeed config `mllm train` uses unless --deepspeed says otherwise
deepspeed = 'zero2'
