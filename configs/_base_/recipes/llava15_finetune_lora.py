# LLaVA-1.5 LoRA finetune (seed 001's finetune_lora.sh): r 128, alpha 256, projector full.
# The script runs ZeRO-3: `mllm train <recipe> --deepspeed zero3 --load-from <stage-1 ckpt>`.
_base_ = [
    '../default_runtime.py',
    '../vision/clip_vit_l_336.py',
    '../datasets/llava_finetune.py',
    '../schedules/llava15_finetune_lora.py',
]

model = dict(type='LLaVAModel', projector=dict(type='MLPProjector', depth=2),
             trainable=['projector'], lora=dict(r=128, alpha=256, dropout=0.05),
             gradient_checkpointing=True)
