"""Loading configs: ``_base_`` inheritance, ``--cfg-options`` and late binding.

A recipe names its LLM and vision tower through top-level keys owned by ``_base_``
primitives (``llm``, ``tokenizer``, ``template`` from ``_base_/llms``; ``vision_encoder``,
``image_processor`` from ``_base_/vision``). They are bound into ``model`` and the datasets
here, after overrides, so a backbone swap is a two-line file that lists another LLM base
(MMEngine forbids two bases defining one key, which rules out putting ``model.llm`` in
the LLM base) and ``--cfg-options llm.pretrained=...`` reaches the built model.
"""
import copy
import os
from typing import Optional, Sequence

from mmengine.config import Config, DictAction  # noqa: F401  (DictAction re-exported for the CLI)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ROOT = os.path.join(PACKAGE_ROOT, 'configs')

# (top-level key, where it is bound) pairs; a complete value already set at the target wins.
MODEL_BINDINGS = ('llm', 'vision_encoder', 'high_res_encoder')
DATASET_BINDINGS = ('tokenizer', 'template', 'image_processor')
DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def find_config(name: str) -> str:
    """A config path, or the file of that name (with or without .py) under ``configs/``."""
    if os.path.isfile(name):
        return name
    stem = os.path.basename(name)
    stem = stem if stem.endswith('.py') else stem + '.py'
    for root, _, files in os.walk(CONFIG_ROOT):
        if stem in files and '_base_' not in root.split(os.sep):
            return os.path.join(root, stem)
    raise FileNotFoundError(f'config not found: {name} (neither a file nor a name under {CONFIG_ROOT}; '
                            'see `mllm list-cfg`)')


def _bind(target, key: str, cfg: Config) -> None:
    """Bind top-level ``cfg[key]`` into ``target[key]``. A partial value at the target (no
    ``type``, e.g. from ``--cfg-options model.vision_encoder.model_kwargs.x=1``) is merged
    over the top-level component rather than replacing it."""
    if key not in cfg:
        return
    current = target.get(key)
    if current is None:
        target[key] = cfg[key]
    elif isinstance(current, dict) and 'type' not in current and isinstance(cfg[key], dict):
        target[key] = Config._merge_a_into_b(current, copy.deepcopy(cfg[key]))


def _bind_dataset(dataset, cfg: Config) -> None:
    if dataset is None:
        return
    if dataset.get('type') == 'ConcatDataset':
        for sub in dataset.get('datasets', []):
            _bind_dataset(sub, cfg)
        return
    for key in DATASET_BINDINGS:
        _bind(dataset, key, cfg)


def _signature_keys(component_cfg) -> set:
    """Argument names of a registered component (its config may leave some out)."""
    import inspect

    from mllm.registry import TRANSFORMS
    cls = TRANSFORMS.get(component_cfg.get('type', ''))
    return set(inspect.signature(cls).parameters) if cls else set()


# `log_backends` names -> MMEngine visualizer backends (all write locally; W&B runs offline)
LOG_BACKENDS = {
    'tensorboard': dict(type='TensorboardVisBackend'),
    'wandb': dict(type='WandbVisBackend', init_kwargs=dict(project='mllm', mode='offline')),
}


def _bind_log_backends(cfg: Config) -> None:
    names = cfg.get('log_backends') or []
    if not names:
        return
    unknown = [n for n in names if n not in LOG_BACKENDS]
    if unknown:
        raise ValueError(f'log_backends: unknown {unknown}; choose from {sorted(LOG_BACKENDS)}')
    visualizer = cfg.get('visualizer')
    if visualizer is None:
        raise ValueError('log_backends needs the `visualizer` of default_runtime.py')
    if 'wandb' in names:
        import importlib.util
        if importlib.util.find_spec('wandb') is None:
            raise ImportError("log_backends=['wandb'] needs the wandb package "
                              '(`pip install wandb`; it is not a requirement of mllm)')
    backends = list(visualizer.get('vis_backends') or [])
    for name in names:
        if not any(b.get('type') == LOG_BACKENDS[name]['type'] for b in backends):
            backends.append(dict(LOG_BACKENDS[name]))
    visualizer['vis_backends'] = backends


def bind_components(cfg: Config) -> Config:
    """Fill ``model`` and datasets from the top-level component keys (see module doc), and
    the visualizer from ``log_backends``."""
    _bind_log_backends(cfg)
    model = cfg.get('model')
    if model is not None:
        for key in MODEL_BINDINGS:
            _bind(model, key, cfg)
        # a slicing processor makes as many tokens per slice as the resampler has queries
        processor, projector = cfg.get('image_processor'), model.get('projector') or {}
        if processor is not None and 'tokens_per_unit' in _signature_keys(processor) \
                and processor.get('tokens_per_unit') is None and 'num_queries' in projector:
            processor['tokens_per_unit'] = projector['num_queries']
    for name in DATALOADERS:
        loader = cfg.get(name)
        if not loader:
            continue
        _bind_dataset(loader.get('dataset'), cfg)
        sampler = loader.get('sampler') or {}
        if sampler.get('type') == 'LengthGroupedSampler':
            # LLaVA groups lengths within a whole optimiser step, not one micro-batch.
            accumulate = cfg.get('optim_wrapper', {}).get('accumulative_counts', 1)
            sampler.setdefault('per_device_batch_size', loader['batch_size'] * accumulate)
    return cfg


def check_override_keys(cfg: Config, options: Optional[dict]) -> None:
    """Reject ``--cfg-options`` whose top-level key the config does not have (typos)."""
    for key in options or {}:
        top = key.split('.')[0]
        if top not in cfg:
            raise KeyError(f'--cfg-options {key}: the config has no top-level key {top!r} '
                           f'(known: {", ".join(sorted(cfg.keys()))})')


def load_config(path: str, cfg_options: Optional[dict] = None,
                allow_new_keys: Sequence[str] = ()) -> Config:
    """Read a config, apply overrides, bind components."""
    cfg = Config.fromfile(find_config(path))
    if cfg_options:
        check_override_keys(cfg, {k: v for k, v in cfg_options.items()
                                  if k.split('.')[0] not in allow_new_keys})
        cfg.merge_from_dict(cfg_options)
    return bind_components(cfg)
