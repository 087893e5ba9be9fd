# LLaVA-1.5 stage 1 (seed 001): lr 1e-3, global batch 256, 1 epoch, warmup 0.03, cosine, wd 0.
# global batch = 8 GPUs x 32 per GPU x 1 accumulation step
optim_wrapper = dict(
    type='AmpOptimWrapper', dtype='bfloat16', loss_scale='dynamic',  # fp32 OptimWrapper on CPU
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0),
    clip_grad=dict(max_norm=1.0, error_if_nonfinite=False),
    accumulative_counts=1,
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-5, by_epoch=True, begin=0, end=0.03,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=0.03, end=1,
         convert_to_iter_based=True),
]
train_cfg = dict(type='TrainLoop', max_epochs=1)
