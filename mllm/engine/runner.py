"""From a loaded config to a running MMEngine runner (XTuner's loop, DeepSpeed optional)."""
import json
import os
from typing import Optional

from mmengine.config import Config

from mllm.engine import patches

DEEPSPEED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', '_base_', 'deepspeed')


def resolve_deepspeed(name_or_path: str) -> str:
    """A DeepSpeed JSON path from a shipped name (``zero2``, ``zero3_offload``...) or a path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(DEEPSPEED_DIR, name_or_path if name_or_path.endswith('.json')
                        else name_or_path + '.json')
    if not os.path.isfile(path):
        shipped = sorted(f[:-5] for f in os.listdir(DEEPSPEED_DIR) if f.endswith('.json'))
        raise FileNotFoundError(f'DeepSpeed config {name_or_path!r} not found; shipped: {shipped}')
    return path


def use_deepspeed(cfg: Config, name_or_path: str) -> None:
    """Switch the config to MMEngine's FlexibleRunner + DeepSpeedStrategy (as xtuner does)."""
    path = resolve_deepspeed(name_or_path)
    with open(path) as f:
        ds_config = json.load(f)
    optim = cfg.optim_wrapper
    clip = optim.get('clip_grad') or {}
    # DeepSpeed owns batching, accumulation and clipping: its "auto" values come from the config
    resolved = dict(train_micro_batch_size_per_gpu=cfg.train_dataloader.batch_size,
                    gradient_accumulation_steps=optim.get('accumulative_counts', 1),
                    gradient_clipping=clip.get('max_norm', 0.0))
    for key, value in resolved.items():
        if ds_config.get(key) == 'auto':
            ds_config[key] = value
    unresolved = [k for k, v in ds_config.items() if v == 'auto']
    if unresolved:
        raise ValueError(f'{path}: cannot resolve "auto" for {unresolved}')
    cfg.strategy = dict(type='DeepSpeedStrategy', config=ds_config,
                        exclude_frozen_parameters=True)
    cfg.optim_wrapper = dict(type='DeepSpeedOptimWrapper', optimizer=optim['optimizer'])
    cfg.runner_type = 'FlexibleRunner'


def build_runner(cfg: Config, work_dir: Optional[str] = None, launcher: str = 'none',
                 resume: Optional[str] = None, load_from: Optional[str] = None,
                 seed: Optional[int] = None, deepspeed: Optional[str] = None):
    """Apply the CLI settings and the compat patches, then build the runner."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    if seed is not None:
        cfg.setdefault('randomness', {})['seed'] = seed
    if load_from is not None:
        cfg.load_from = load_from
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume:
        cfg.resume, cfg.load_from = True, resume
    cfg.launcher = launcher
    if deepspeed:
        use_deepspeed(cfg, deepspeed)
    patches.apply_all(cfg, launcher)
    if cfg.get('runner_type') == 'FlexibleRunner':
        from mmengine.runner import FlexibleRunner
        return FlexibleRunner.from_cfg(cfg)
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg)
