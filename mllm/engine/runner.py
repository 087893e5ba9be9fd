"""From a loaded config to a running MMEngine runner (XTuner's loop, DeepSpeed optional)."""
import json
import logging
import os
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log

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


def resolve_precision(ds_config: dict, path: str) -> str:
    """Resolve ``"enabled": "auto"`` of the ``bf16`` / ``fp16`` sections (XTuner's JSONs)
    and return the precision the run uses.

    With CUDA, "auto" means bf16 where the GPU supports it, else fp16 (XTuner's rule).
    Without CUDA, DeepSpeed's CPU accelerator supports bf16 and fp32 but not fp16: "auto"
    and fp16 become fp32 (logged), as ``patches.cpu_optim_wrapper`` does for AMP, so a CPU
    run trains in the precision of a single-process CPU run; an explicit bf16 is kept.
    """
    cuda = torch.cuda.is_available()
    auto_dtype = ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if cuda else None
    for key in ('bf16', 'fp16'):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get('enabled') == 'auto':
            section['enabled'] = key == auto_dtype
    fp16 = ds_config.get('fp16') or {}
    if fp16.get('enabled') and not cuda:
        fp16['enabled'] = False
        print_log(f'{path}: fp16 needs CUDA (DeepSpeed on CPU supports bf16 and fp32); '
                  'training in fp32', logger='current', level=logging.WARNING)
    bf16 = ds_config.get('bf16') or {}
    if bf16.get('enabled') and fp16.get('enabled'):
        fp16['enabled'] = False  # XTuner's rule: both on means bf16
    return 'bf16' if bf16.get('enabled') else 'fp16' if fp16.get('enabled') else 'fp32'


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
    precision = resolve_precision(ds_config, path)
    unresolved = [k for k, v in ds_config.items() if v == 'auto']
    if unresolved:
        raise ValueError(f'{path}: cannot resolve "auto" for {unresolved}')
    cfg.strategy = dict(type='DeepSpeedStrategy', config=ds_config,
                        exclude_frozen_parameters=True)
    cfg.optim_wrapper = dict(type='DeepSpeedOptimWrapper', optimizer=optim['optimizer'])
    cfg.runner_type = 'FlexibleRunner'
    stage = ds_config.get('zero_optimization', {}).get('stage', 0)
    print_log(f'DeepSpeed {os.path.basename(path)}: ZeRO-{stage}, {precision}, micro-batch '
              f'{ds_config["train_micro_batch_size_per_gpu"]} per process, accumulation '
              f'{ds_config["gradient_accumulation_steps"]}', logger='current', level=logging.INFO)


def resolve_start(cfg: Config, work_dir: str, resume: Optional[str],
                  load_from: Optional[str]) -> None:
    """Decide how the run starts and set ``cfg.resume`` / ``cfg.load_from`` accordingly.

    - ``resume='auto'``: the newest complete, intact checkpoint of the work dir (scanned,
      not read from ``last_checkpoint``; damaged newer ones are named and skipped); with
      none, a fresh start from ``load_from`` as if ``--resume`` had not been given.
    - ``resume=PATH``: that checkpoint.
    - otherwise a fresh start, which a work dir holding another run's checkpoints refuses:
      its iterations would overwrite them.
    A fresh start of a recipe with ``load_from_required`` needs ``load_from``. Interrupted
    saves (``.iter_N.pth.partial``) are removed first.
    """
    from mllm.engine.checkpoint import checkpoints_in, newest_valid_checkpoint, remove_partials

    load_from = load_from or cfg.get('load_from')
    if os.path.isdir(work_dir) and is_main_process_env():
        remove_partials(work_dir)
    existing = checkpoints_in(work_dir) if os.path.isdir(work_dir) else []
    if resume == 'auto':
        resume = newest_valid_checkpoint(work_dir) if existing else None
        if resume is None and existing:
            raise RuntimeError(f'--resume auto: no checkpoint of {work_dir} is complete and '
                               f'intact ({", ".join(map(os.path.basename, existing))}; see the '
                               'warnings above). Move them away to start afresh.')
        print_log(f'--resume auto: resuming from {resume}' if resume else
                  f'--resume auto: {work_dir} holds no checkpoint yet; starting '
                  + (f'from {load_from}' if load_from else 'from the config\'s weights'),
                  logger='current', level=logging.INFO)
    elif not resume and existing:
        raise RuntimeError(f'{work_dir} already holds checkpoints of another run '
                           f'({", ".join(map(os.path.basename, existing[:3]))}); this run would '
                           'overwrite them. Pass --resume auto to continue that run, or '
                           'choose another --work-dir.')
    required = cfg.get('load_from_required')
    if not resume and required and not load_from:
        raise ValueError(f'this recipe starts from {required}: pass --load-from PATH')
    cfg.resume = bool(resume)
    cfg.load_from = resume or load_from


def is_main_process_env() -> bool:
    """Rank 0 of the launch (the runner's process group does not exist yet)."""
    return int(os.environ.get('RANK', 0)) == 0


def build_runner(cfg: Config, work_dir: Optional[str] = None, launcher: str = 'none',
                 resume: Optional[str] = None, load_from: Optional[str] = None,
                 seed: Optional[int] = None, deepspeed: Optional[str] = None):
    """Apply the CLI settings and the compat patches, then build the runner."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    if seed is not None:
        cfg.setdefault('randomness', {})['seed'] = seed
    resolve_start(cfg, cfg.work_dir, resume, load_from)
    cfg.launcher = launcher
    if deepspeed:
        use_deepspeed(cfg, deepspeed)
    hooks = [*(cfg.get('custom_hooks') or [])]
    if launcher != 'none':  # log the mean loss over ranks, not rank 0's
        hooks.append(dict(type='RankMeanLossHook'))
    if not any(h.get('type') in ('SafeCheckpointHook', 'mllm.SafeCheckpointHook') for h in hooks):
        hooks.append(dict(type='SafeCheckpointHook'))  # checkpoints torch loads safely
    cfg.custom_hooks = hooks
    patches.apply_all(cfg, launcher)
    if cfg.get('runner_type') == 'FlexibleRunner':
        from mmengine.runner import FlexibleRunner
        return FlexibleRunner.from_cfg(cfg)
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg)
