# The tiny LLaVA recipe without an LLM (configs/tiny/tiny_llava_synthetic.py adds tiny_llama),
# so a sweep (or a two-line swap) can list any tiny LLM base next to it:
#   mllm sweep tiny_llava_synthetic --llms tiny_llama_small,tiny_llama,tiny_llama_large
_base_ = [
    '../default_runtime.py',
    '../vision/tiny_clip.py',
    '../datasets/synthetic_vqa.py',
]

# model
model = dict(type='LLaVAModel', trainable=['vision_encoder', 'projector', 'llm'])

# schedule: REFERENCE.md §3 — from scratch on this CPU, lr 3e-4 learns where 1e-3 stalls
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0),
    clip_grad=dict(max_norm=1.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=3e-5, by_epoch=False, begin=50, end=600),
]
train_cfg = dict(type='TrainLoop', max_iters=600)

# runtime
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=300, max_keep_ckpts=1))
