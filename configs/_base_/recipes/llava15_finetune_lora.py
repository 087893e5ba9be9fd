# LLaVA-1.5 LoRA finetune (seed 001's finetune_lora.sh): LoRA r 128 / alpha 256 on the LLM
# at lr 2e-4, the projector fully at 2e-5. The script runs ZeRO-3:
# `mllm train <recipe> --deepspeed zero3 --load-from <stage-1 ckpt>`.
_base_ = ['./llava15_finetune.py']

model = dict(trainable=['projector'], lora=dict(r=128, alpha=256, dropout=0.05))
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(custom_keys={'projector': dict(lr_mult=0.1)}),  # 2e-5 on the projector
)
