"""Compatibility patches for MMEngine/XTuner on CPU and recent PyTorch.

Each patch is one function, applied by ``apply_all`` before a runner is built, and names
the upstream behaviour it works around. None of them changes behaviour on a setup where
upstream already works.
"""
import logging
import pickle

import torch
from mmengine.logging import print_log


def load_trusted_checkpoint(filename: str, map_location='cpu'):
    """``torch.load`` with ``weights_only=True`` first; checkpoints that hold runner state
    (MessageHub, numpy RNG state, ConfigDict) fall back to ``weights_only=False`` with a
    log line, so only load checkpoints you trust."""
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        print_log(f'{filename} holds non-tensor objects (runner state); loading it with '
                  'weights_only=False — only load checkpoints you trust',
                  logger='current', level=logging.INFO)
        return torch.load(filename, map_location=map_location, weights_only=False)


def patch_checkpoint_loading() -> None:
    """mmengine 0.10.6 calls ``torch.load`` without ``weights_only``; torch >= 2.6 then
    defaults to ``weights_only=True`` and refuses mmengine's own checkpoints. Route its
    local loads through ``load_trusted_checkpoint``."""
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes='', force=True)(load_trusted_checkpoint)


def cpu_optim_wrapper(cfg) -> None:
    """``AmpOptimWrapper`` asserts CUDA; on a CPU-only machine train in fp32 with the
    plain ``OptimWrapper`` (same optimizer, clipping and accumulation)."""
    optim = cfg.get('optim_wrapper')
    if torch.cuda.is_available() or not optim or optim.get('type') != 'AmpOptimWrapper':
        return
    optim['type'] = 'OptimWrapper'
    for key in ('dtype', 'loss_scale'):
        optim.pop(key, None)
    print_log('no CUDA device: AmpOptimWrapper -> OptimWrapper (fp32)', logger='current',
              level=logging.WARNING)


def cpu_distributed(cfg, launcher: str) -> None:
    """mmengine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally and its DDP
    wrapper passes ``device_ids=[LOCAL_RANK]``; both fail without CUDA. On CPU, start the
    gloo process group here (mmengine then skips ``init_dist``) and use a DDP wrapper
    that leaves ``device_ids`` unset."""
    if launcher == 'none' or torch.cuda.is_available():
        return
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    if cfg.get('strategy') is None:  # DeepSpeed wraps the model itself
        wrapper = cfg.get('model_wrapper_cfg') or {}
        wrapper.setdefault('type', 'mllm.CPUCompatibleDDP')  # runner looks up the root registry
        cfg['model_wrapper_cfg'] = wrapper


def skip_nonfinite_steps(cfg) -> None:
    """MMEngine steps the optimizer on a NaN/inf loss and writes NaN weights. With
    ``nonfinite_loss=dict(max_consecutive=K)`` in the config, use the optimizer wrappers
    of ``mllm.engine.optim_wrappers`` that skip such steps and stop after K in a row.
    DeepSpeed's wrapper is left alone (not covered yet)."""
    from mllm.engine import optim_wrappers  # registers the wrappers

    options, optim = cfg.get('nonfinite_loss'), cfg.get('optim_wrapper')
    swaps = {'OptimWrapper': optim_wrappers.SkipNonFiniteOptimWrapper.__name__,
             'AmpOptimWrapper': optim_wrappers.SkipNonFiniteAmpOptimWrapper.__name__}
    if not options or not optim or optim.get('type', 'OptimWrapper') not in swaps:
        return
    optim['type'] = 'mllm.' + swaps[optim.get('type', 'OptimWrapper')]
    optim['max_consecutive'] = options.get('max_consecutive', 5)


def apply_all(cfg, launcher: str = 'none') -> None:
    patch_checkpoint_loading()
    cpu_optim_wrapper(cfg)
    cpu_distributed(cfg, launcher)
    skip_nonfinite_steps(cfg)


def lmms_eval_keep_loglikelihood_pairs() -> None:
    """lmms-eval 0.7's evaluator passes every model output through
    ``unwrap_generation_output``, which turns anything but text into ``str(output)``: the
    ``(logprob, is_greedy)`` pairs of ``loglikelihood`` become strings and every
    multiple_choice/loglikelihood task fails in ``process_results`` ("too many values to
    unpack"). Let such pairs through unchanged. Applied by the mllm lmms-eval adapter; a
    no-op when lmms-eval's evaluator is not loaded or has no such function (< 0.7)."""
    import sys

    evaluator = sys.modules.get('lmms_eval.evaluator')
    unwrap = getattr(evaluator, 'unwrap_generation_output', None)
    if unwrap is None or getattr(unwrap, 'keeps_loglikelihood_pairs', False):
        return

    def unwrap_generation_output(output):
        if (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], bool)
                and isinstance(output[0], (int, float))):
            return output, None
        return unwrap(output)

    unwrap_generation_output.keeps_loglikelihood_pairs = True
    evaluator.unwrap_generation_output = unwrap_generation_output
