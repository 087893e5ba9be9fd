"""Compatibility patches for MMEngine/XTuner on CPU and recent PyTorch.

Each patch is one function, applied by ``apply_all`` before a runner is built, and names
the upstream behaviour it works around. None of them changes behaviour on a setup where
upstream already works.
"""
import logging
import pickle

import torch
from mmengine.logging import print_log

from mllm.engine import compat


def timm_weights_only() -> None:
    """timm's ``load_pretrained`` reads a local weights file (``pretrained_cfg_overlay=
    dict(file=...)``, how ``ConvNeXtEncoder(backend='timm')`` loads) with
    ``load_state_dict(path)``, whose default is ``weights_only=False``: a crafted file runs
    code (timm 1.0.31 defaults to True but wraps the refusal in a RuntimeError). Load it with
    ``weights_only=True``; a file that needs more loads only when the user trusted it by
    name (``mllm.engine.checkpoint.trust_checkpoint``)."""
    from timm.models import _builder

    from mllm.engine.checkpoint import CheckpointError, is_trusted, verify_file

    original = _builder.load_state_dict
    if hasattr(original, 'weights_only_first'):
        return

    def load_state_dict(checkpoint_path, *args, **kwargs):
        kwargs.pop('weights_only', None)
        verify_file(checkpoint_path)
        try:
            return original(checkpoint_path, *args, weights_only=True, **kwargs)
        except (pickle.UnpicklingError, RuntimeError) as err:
            # timm >= 1.0.2x re-raises the UnpicklingError as a RuntimeError
            if not isinstance(err, pickle.UnpicklingError) and not isinstance(
                    err.__cause__, pickle.UnpicklingError):
                raise
            if not is_trusted(checkpoint_path):
                raise CheckpointError(
                    f'{checkpoint_path} holds objects that torch\'s safe loader refuses ({err}'
                    f'); if you trust this file, pass --trust-checkpoint {checkpoint_path}'
                ) from None
            print_log(f'{checkpoint_path}: loading with the full unpickler, as '
                      '--trust-checkpoint asked', logger='current', level=logging.WARNING)
            return original(checkpoint_path, *args, weights_only=False, **kwargs)

    load_state_dict.weights_only_first = original
    _builder.load_state_dict = load_state_dict


def patch_checkpoint_loading() -> None:
    """mmengine 0.10.6 calls ``torch.load`` without ``weights_only`` (torch < 2.6 then
    unpickles anything; torch >= 2.6 refuses MMEngine's own runner state). Route its local
    loads through ``mllm.engine.checkpoint.load_checkpoint_file``: safe loading, checksum
    verified, mllm's encoded runner state decoded."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from mllm.engine.checkpoint import load_checkpoint_file

    CheckpointLoader.register_scheme(prefixes='', force=True)(load_checkpoint_file)


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
    of ``mllm.engine.optim_wrappers`` that skip such steps and stop after K in a row
    (``DeepSpeedOptimWrapper`` included: there the loss decides, checked on every rank)."""
    from mllm.engine import optim_wrappers  # registers the wrappers

    options, optim = cfg.get('nonfinite_loss'), cfg.get('optim_wrapper')
    swaps = {'OptimWrapper': optim_wrappers.SkipNonFiniteOptimWrapper.__name__,
             'AmpOptimWrapper': optim_wrappers.SkipNonFiniteAmpOptimWrapper.__name__,
             'DeepSpeedOptimWrapper': 'SkipNonFiniteDeepSpeedOptimWrapper'}
    if not options or not optim or optim.get('type', 'OptimWrapper') not in swaps:
        return
    if optim.get('type') == 'DeepSpeedOptimWrapper':
        optim_wrappers.register_deepspeed_wrapper()  # imports DeepSpeed (seconds): only here
    optim['type'] = 'mllm.' + swaps[optim.get('type', 'OptimWrapper')]
    optim['max_consecutive'] = options.get('max_consecutive', 5)


def deepspeed_model_init_seed() -> None:
    """MMEngine's ``Runner`` builds the model right after seeding; ``FlexibleRunner`` builds
    it in ``train()``, after the data loaders, from a used random state, so the same seed
    gave other initial weights under DeepSpeed than in a single-process run. Re-seed just
    before the strategy builds the model, as ``Runner`` is then."""
    from mmengine._strategy.deepspeed import DeepSpeedStrategy

    original = DeepSpeedStrategy.build_model
    if hasattr(original, 'reseeds'):
        return

    def build_model(self, model):
        if isinstance(model, dict) and self._randomness.get('seed') is not None:
            self._set_randomness(**self._randomness)  # the configured seed, applied again
        return original(self, model)

    build_model.reseeds = original
    DeepSpeedStrategy.build_model = build_model


def deepspeed_checkpoint_loading() -> None:
    """DeepSpeed's ``TorchCheckpointEngine.load`` unpickles every checkpoint file with
    ``weights_only=False``, silently, and its ``save`` pickles MMEngine's runner state
    (``HistoryBuffer``, NumPy values) as objects. Save that state as plain types
    (``encode_state``) and load every file through ``load_checkpoint_file``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import \
        TorchCheckpointEngine

    from mllm.engine.checkpoint import encode_state, load_checkpoint_file

    original_save = getattr(TorchCheckpointEngine.save, 'encodes', TorchCheckpointEngine.save)

    def save(self, state_dict, path: str):
        return original_save(self, encode_state(state_dict), path)

    def load(self, path: str, map_location=None):
        return load_checkpoint_file(path, map_location=map_location)

    save.encodes = original_save
    TorchCheckpointEngine.save, TorchCheckpointEngine.load = save, load


def sdpa_segment_masks() -> None:
    """transformers 4.48 takes attention masks as dense tensors only: ``_update_causal_mask``
    (Llama, Mistral, Qwen2, Phi-3) expands a 2-D padding mask to (B, 1, T, T) and SDPA
    reads it in full. mllm's packed batches pass a 1-D tensor of segment boundaries
    instead (``mllm.models.varlen_attention``; transformers never makes a 1-D mask): let
    ``_update_causal_mask`` return it unchanged and route it, in the SDPA attention
    function, to one causal SDPA call per segment. Every other mask keeps upstream's path.
    transformers 5 has no ``_update_causal_mask``: there the SDPA mask function of
    ``masking_utils`` passes the segments through instead (``pass_segment_masks_v5``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaModel
    from transformers.models.mistral.modeling_mistral import MistralModel
    from transformers.models.phi3.modeling_phi3 import Phi3Model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    from mllm.models.varlen_attention import is_segment_mask, segment_sdpa_attention

    for cls in (LlamaModel, MistralModel, Qwen2Model, Phi3Model):
        original = getattr(cls, '_update_causal_mask', None)  # transformers 5: none
        if original is None or hasattr(original, 'passes_segments'):
            continue

        def update_causal_mask(self, attention_mask, *args, _original=original, **kwargs):
            if is_segment_mask(attention_mask):
                return attention_mask
            return _original(self, attention_mask, *args, **kwargs)

        update_causal_mask.passes_segments = original
        cls._update_causal_mask = update_causal_mask

    if not hasattr(LlamaModel, '_update_causal_mask'):
        from mllm.models.varlen_attention import pass_segment_masks_v5
        pass_segment_masks_v5()  # transformers 5 builds masks in masking_utils
    sdpa = ALL_ATTENTION_FUNCTIONS['sdpa']
    if hasattr(sdpa, 'passes_segments'):
        return

    def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       **kwargs):
        if is_segment_mask(attention_mask):
            return segment_sdpa_attention(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling)
        return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                    scaling=scaling, **kwargs)

    sdpa_attention.passes_segments = sdpa
    ALL_ATTENTION_FUNCTIONS['sdpa'] = sdpa_attention


def apply_all(cfg, launcher: str = 'none') -> None:
    compat.apply_all()  # XTuner / MMEngine on the current transformers and DeepSpeed
    patch_checkpoint_loading()
    cpu_optim_wrapper(cfg)
    cpu_distributed(cfg, launcher)
    skip_nonfinite_steps(cfg)
    if (cfg.get('strategy') or {}).get('type') == 'DeepSpeedStrategy':
        deepspeed_model_init_seed()
        deepspeed_checkpoint_loading()


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
