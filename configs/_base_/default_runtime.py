# Runtime shared by every recipe: MMEngine's hooks, logging, checkpoints.
default_scope = 'mllm'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # iteration-based `iter_N.pth` checkpoints, written atomically; keep the last two
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# checkpoints hold only the trainable tensors, plus the RNG states that resuming restores;
# tokens/s, samples/s (TFLOPs on GPU) are logged
custom_hooks = [dict(type='TrainableCheckpointHook'), dict(type='RNGStateHook'),
                dict(type='ThroughputHook')]
# skip an optimizer step whose loss or gradient norm is NaN/inf (weights unchanged, logged);
# stop after this many in a row. None turns it off (mllm.engine.optim_wrappers)
nonfinite_loss = dict(max_consecutive=5)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),  # switched to gloo on CPU
)
# per-iteration scalars land in <work_dir>/<timestamp>/vis_data/scalars.json
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
# more logging backends, off by default and offline: 'tensorboard' (event files next to
# scalars.json) and/or 'wandb' (offline mode; `pip install wandb`, `wandb sync` to upload),
# e.g. --cfg-options "log_backends=['tensorboard']"
log_backends = []
log_processor = dict(by_epoch=False, window_size=1)
# memory of one GPU that model.gradient_checkpointing='auto' plans for (mllm.bench.memory);
# None: the GPU's own (the whole device). Set it below the device to leave room.
gpu_mem_gb = None
log_level = 'INFO'
load_from = None
# --load-from must fit the model: keys that match nothing, other shapes, or random-init frozen
# parts left without weights stop the run (mllm.engine.runner.StrictLoadHook); False loads what
# matches and logs the rest (a partial load on purpose)
load_from_strict = True
resume = False
randomness = dict(seed=42, deterministic=False)
