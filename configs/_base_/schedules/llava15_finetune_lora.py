# LLaVA-1.5 LoRA finetune (seed 001 script): lr 2e-4, projector lr 2e-5, batch 128.
_base_ = ['./llava15_pretrain.py']
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(custom_keys={'projector': dict(lr_mult=0.1)}),  # 2e-5 on the projector
)
