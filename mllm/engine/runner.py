"""From a loaded config to a running MMEngine runner (XTuner's loop, DeepSpeed optional)."""
import json
import logging
import os
from typing import Callable, Optional

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import print_log

from mllm.engine import patches
from mllm.registry import HOOKS

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
    if not resume and load_from:
        refuse_foreign_weights(load_from)
    cfg.resume = bool(resume)
    cfg.load_from = resume or load_from


IMPORT_HINT = ('released weights (llava-hf, an original LLaVA-1.5 folder or its mm_projector.bin, '
               'ConvLLaVA, MG-LLaVA, LLaVA-UHD) must be imported first: `mllm convert hf-to-pth '
               'CONFIG SRC OUT.pth`, then --load-from OUT.pth')


def refuse_foreign_weights(load_from: str) -> None:
    """A Hugging Face folder or a safetensors file is never an mllm checkpoint: say so before
    anything is built (what is inside a .pth is checked when it loads, ``StrictLoadHook``)."""
    if os.path.isdir(load_from):
        names = os.listdir(load_from)
        if 'config.json' in names or any(n.endswith(('.safetensors', '.bin')) for n in names):
            raise ValueError(f'--load-from {load_from} is a Hugging Face folder, not an mllm '
                             f'checkpoint; {IMPORT_HINT}')
    elif load_from.endswith(('.safetensors', '.safetensors.index.json')):
        raise ValueError(f'--load-from {load_from} is a safetensors file, not an mllm checkpoint; '
                         f'{IMPORT_HINT}')


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f' ... ({len(keys)} in all)' if len(keys) > n else '')


def load_problems(model, state: dict) -> list:
    """Why ``state`` (a checkpoint's model weights) does not fit ``model``: keys that match
    nothing in it, tensors of another shape, and frozen tensors of parts that always start
    random (projectors, fusion, a new ConvNeXt stage: ``weight_origin`` None) that it leaves
    out. Tensors left out of trainable parts, or of parts the config loads from
    ``pretrained`` (or builds at random from ``config=``), are what a stage hand-over omits."""
    from mllm.models.llava import weight_origin

    target = model.state_dict()
    flat, wrapped = 'vision_encoder.model.', 'vision_encoder.model.vision_model.'

    def place(key):  # CLIP keys of transformers 4.x / 5.x load either way (vision.py)
        if key in target:
            return key
        other = (flat + key[len(wrapped):] if key.startswith(wrapped) else
                 wrapped + key[len(flat):] if key.startswith(flat) else None)
        return other if other in target else None

    placed = {k: place(k) for k in state}
    unexpected = [k for k, p in placed.items() if p is None]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(target[p].shape)}'
              for k, p in placed.items() if p is not None and hasattr(state[k], 'shape')
              and tuple(state[k].shape) != tuple(target[p].shape)]
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    got = set(placed.values())
    unloaded = [k for k in target if k not in got and k not in trains
                and weight_origin(model, k) is None]
    problems = []
    if unexpected:
        problems.append(f'{len(unexpected)} of its {len(state)} tensors match nothing in the '
                        f'model: {_few(unexpected)}')
    if shapes:
        problems.append(f'{len(shapes)} tensors have another shape: {_few(shapes)}')
    if unloaded:
        parts = sorted({k.split('.')[0] for k in unloaded})
        problems.append(f'frozen parts that start from random weights get no tensor from it '
                        f'({", ".join(parts)}): {_few(unloaded)}')
    return problems


@HOOKS.register_module()
class StrictLoadHook(Hook):
    """``--load-from`` / resume must fit the model (``load_problems``): otherwise the run
    stops before its first step, naming the keys, instead of training from random weights
    with one warning among hundreds of log lines. ``load_from_strict=False`` in the config
    loads what matches and logs the rest (partial loads on purpose).

    Runs before ``TrainableCheckpointHook`` fills the frozen tensors in."""

    priority = 'VERY_HIGH'

    def __init__(self, strict: bool = True):
        self.strict = strict

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.model import is_model_wrapper

        state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            return
        state = {k[len('module.'):] if k.startswith('module.') else k: v
                 for k, v in state.items() if hasattr(v, 'shape')}
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        problems = load_problems(model, state)
        if not problems:
            return
        source = runner._load_from or 'the checkpoint'
        message = (f'{source} does not fit this model:\n  - ' + '\n  - '.join(problems))
        if not self.strict:
            runner.logger.warning(message + '\nload_from_strict=False: loading the tensors that '
                                  'match, the rest keeps its initial weights')
            return
        raise ValueError(message + f'\nIf it is a released checkpoint, {IMPORT_HINT}. To load '
                         'only the matching tensors on purpose, set load_from_strict=False '
                         '(--cfg-options load_from_strict=False).')


def is_main_process_env() -> bool:
    """Rank 0 of the launch (the runner's process group does not exist yet)."""
    return int(os.environ.get('RANK', 0)) == 0


def build_runner(cfg: Config, work_dir: Optional[str] = None, launcher: str = 'none',
                 resume: Optional[str] = None, load_from: Optional[str] = None,
                 seed: Optional[int] = None, deepspeed: Optional[str] = None,
                 plan_checkpointing: Optional[Callable] = None):
    """Apply the CLI settings and the compat patches, then build the runner.

    ``plan_checkpointing(cfg, logger=...)`` resolves ``model.gradient_checkpointing='auto'``
    once the DeepSpeed stage is known (``mllm train`` passes the memory planner's
    ``resolve_auto_checkpointing``; the planner sits above the engine, so it is handed in).
    Left 'auto', the model refuses to train and says so.
    """
    if work_dir is not None:
        cfg.work_dir = work_dir
    if seed is not None:
        cfg.setdefault('randomness', {})['seed'] = seed
    resolve_start(cfg, cfg.work_dir, resume, load_from)
    cfg.launcher = launcher
    if deepspeed:
        use_deepspeed(cfg, deepspeed)
    # model.gradient_checkpointing='auto': the memory plan's layers for this run's GPUs,
    # ZeRO stage, micro-batch and data lengths
    plan_messages = []
    if plan_checkpointing is not None:
        plan_checkpointing(cfg, logger=plan_messages.append)
    hooks = [*(cfg.get('custom_hooks') or [])]
    if launcher != 'none':  # log the mean loss over ranks, not rank 0's
        hooks.append(dict(type='RankMeanLossHook'))
    if not any(h.get('type') in ('SafeCheckpointHook', 'mllm.SafeCheckpointHook') for h in hooks):
        hooks.append(dict(type='SafeCheckpointHook'))  # checkpoints torch loads safely
    # a checkpoint that does not fit the model stops the run before its first step
    if not any(h.get('type') in ('StrictLoadHook', 'mllm.StrictLoadHook') for h in hooks):
        hooks.append(dict(type='StrictLoadHook', strict=cfg.get('load_from_strict', True)))
    cfg.custom_hooks = hooks
    patches.apply_all(cfg, launcher)
    if cfg.get('runner_type') == 'FlexibleRunner':
        from mmengine.runner import FlexibleRunner as Runner
    else:
        from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    # through the run's own logger: into this run's log file, not only onto the console
    # (before the runner exists, 'current' is the default logger or an earlier run's)
    for message in plan_messages:
        runner.logger.info(message)
    return runner
