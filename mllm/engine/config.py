"""Loading configs: ``_base_`` inheritance, ``--cfg-options`` and late binding.

A recipe names its LLM and vision tower through top-level keys owned by ``_base_``
primitives (``llm``, ``tokenizer``, ``template`` from ``_base_/llms``; ``vision_encoder``,
``image_processor`` from ``_base_/vision``). They are bound into ``model`` and the datasets
here, after overrides, so a backbone swap is a two-line file that lists another LLM base
(MMEngine forbids two bases defining one key, which rules out putting ``model.llm`` in
the LLM base) and ``--cfg-options llm.pretrained=...`` reaches the built model.
"""
import copy
import difflib
import inspect
import os
from typing import Optional, Sequence

from mmengine.config import Config, DictAction  # noqa: F401  (DictAction re-exported for the CLI)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ROOT = os.path.join(PACKAGE_ROOT, 'configs')

# (top-level key, where it is bound) pairs; a complete value already set at the target wins.
MODEL_BINDINGS = ('llm', 'vision_encoder', 'high_res_encoder')
DATASET_BINDINGS = ('tokenizer', 'template', 'image_processor')
DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


class ConfigError(KeyError):
    """A config or ``--cfg-options`` mistake (a ``KeyError`` whose message prints unquoted)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


def shipped_config_names() -> list:
    """Names of the shipped configs (``_base_`` primitives excluded)."""
    return sorted(os.path.splitext(f)[0] for root, _, files in os.walk(CONFIG_ROOT)
                  if '_base_' not in root.split(os.sep) for f in files if f.endswith('.py'))


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.7)
    return f' (did you mean {" or ".join(repr(c) for c in close)}?)' if close else ''


def find_config(name: str) -> str:
    """A config path, or the file of that name (with or without .py) under ``configs/``."""
    if os.path.isfile(name):
        return name
    stem = os.path.basename(name)
    stem = stem if stem.endswith('.py') else stem + '.py'
    for root, _, files in os.walk(CONFIG_ROOT):
        if stem in files and '_base_' not in root.split(os.sep):
            return os.path.join(root, stem)
    hint = did_you_mean(stem[:-3], shipped_config_names()) or '; see `mllm list-cfg`'
    raise FileNotFoundError(f'config not found: {name} (neither a file nor a name under '
                            f'{CONFIG_ROOT}){hint}')


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


def _bind_parts(cfg: Config) -> None:
    """Fill ``model`` and the datasets from the top-level component keys."""
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


def bind_components(cfg: Config) -> Config:
    """Fill ``model`` and datasets from the top-level component keys (see module doc), and
    the visualizer from ``log_backends``."""
    _bind_log_backends(cfg)
    _bind_parts(cfg)
    return cfg


# Untyped dicts that are keyword bags handed on as they are (HF config fields, tokenizer
# from_pretrained kwargs, timm/open_clip kwargs, torch.distributed / clip_grad_norm_ arguments,
# paramwise rules): any key may be new.
OPEN_DICTS = ('config', 'tokenizer', 'custom_keys', 'clip_grad', 'mp_cfg', 'dist_cfg', 'env_cfg',
              'paramwise_cfg')
# Untyped dicts whose possible keys are known although the config may leave some out.
KNOWN_KEYS = {'lora': ('r', 'alpha', 'dropout', 'target_modules', 'bias')}


def _component_arguments(type_) -> set:
    """Named arguments of a registered component (``type`` name or class), following
    ``**kwargs`` up the base classes; empty when the type does not resolve."""
    if isinstance(type_, str):
        from mllm import registry
        cls = None
        for reg in (registry.MODELS, registry.DATASETS, registry.TRANSFORMS, registry.LOOPS,
                    registry.HOOKS, registry.OPTIM_WRAPPERS, registry.OPTIMIZERS,
                    registry.PARAM_SCHEDULERS, registry.DATA_SAMPLERS, registry.FUNCTIONS,
                    registry.MODEL_WRAPPERS):
            cls = reg.get(type_)
            if cls is not None:
                break
    else:
        cls = type_
    if isinstance(cls, type):  # each __init__ that hands **kwargs on, up to one that does not
        inits = [vars(k)['__init__'] for k in cls.__mro__ if '__init__' in vars(k)]
    else:
        inits = [cls] if callable(cls) else []
    names = set()
    for init in inits:
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature
            break
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {'self'}


def _allowed_new_keys(name: str, node: dict):
    """The keys ``node`` (the dict at key ``name``) may gain, or None for any key."""
    if name in OPEN_DICTS or name.endswith('kwargs'):
        return None
    if name in KNOWN_KEYS:
        return set(KNOWN_KEYS[name])
    if name in DATALOADERS:
        import torch.utils.data
        return _component_arguments(torch.utils.data.DataLoader)
    return _component_arguments(node['type']) if 'type' in node else set()


def _check_override_key(cfg: Config, key: str) -> None:
    """Each part of the dotted ``key`` must exist in ``cfg`` (bound: ``model.llm`` is there),
    except a new key that the dict holding it accepts (``_allowed_new_keys``)."""
    parts = key.split('.')
    if parts[0] not in cfg:
        raise ConfigError(f'--cfg-options {key}: the config has no top-level key {parts[0]!r}'
                          f'{did_you_mean(parts[0], cfg.keys())} (known: '
                          f'{", ".join(sorted(cfg.keys()))}; prefix the key with + to add it)')
    node = cfg[parts[0]]
    for depth in range(1, len(parts)):
        part, name = parts[depth], parts[depth - 1]
        if isinstance(node, (list, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f'--cfg-options {key}: {".".join(parts[:depth])} is a list of '
                                  f'{len(node)}; {part!r} is not an index of it')
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            return  # MMEngine refuses to merge a dict into a non-dict, naming the key
        if part in node:
            node = node[part]
            continue
        allowed = _allowed_new_keys(name, node)
        if allowed is None or part in allowed:  # what lies below a new key is new as well
            return
        raise ConfigError(f'--cfg-options {key}: {".".join(parts[:depth])} has no key {part!r}'
                          f'{did_you_mean(part, set(node) | allowed)} (it has: '
                          f'{", ".join(sorted(map(str, node)))}; prefix the key with + to add '
                          'a new one)')


def check_override_keys(cfg: Config, options: Optional[dict]) -> None:
    """Reject ``--cfg-options`` keys the config does not have (typos), at any depth. The
    check runs on the bound config (module doc), so ``model.vision_encoder.x`` is checked
    against the encoder the model will get."""
    if not options:
        return
    bound = copy.deepcopy(cfg)
    _bind_parts(bound)
    for key in options:
        _check_override_key(bound, key)


def load_config(path: str, cfg_options: Optional[dict] = None,
                allow_new_keys: Sequence[str] = ()) -> Config:
    """Read a config, apply overrides, bind components. An override key starting with ``+``
    may add a key the config does not have (as in Hydra); any other must exist."""
    cfg = Config.fromfile(find_config(path))
    if cfg_options:
        checked = {k: v for k, v in cfg_options.items()
                   if not k.startswith('+') and k.split('.')[0] not in allow_new_keys}
        check_override_keys(cfg, checked)
        cfg.merge_from_dict({k.removeprefix('+'): v for k, v in cfg_options.items()})
    return bind_components(cfg)
