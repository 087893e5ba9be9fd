"""Compatibility patches that let XTuner 0.2.0 and MMEngine 0.10.7 run on the current stack
(transformers 5.x, DeepSpeed 0.19.x).

XTuner 0.2.0 (July 2025, its latest release) is written against transformers 4.48 and
MMEngine against DeepSpeed < 0.19.8. mllm takes XTuner's ``TrainLoop`` and
``LengthGroupedSampler`` (and, for ``mllm bench train``, its ``LLaVAModel``, datasets and
collate function). Each patch below is one function that names the upstream change it
bridges; ``apply_all`` runs them before XTuner is imported (``mllm.engine.loops``,
``mllm.datasets.samplers`` and ``mllm.bench.benchmark`` call it first). Every patch is a
no-op where upstream already works (transformers 4.48, DeepSpeed < 0.19.8), imports
nothing heavy that the caller would not import anyway, and can be applied repeatedly.
"""
import importlib.util
import os.path as osp
import sys
import types


def transformers_is_safetensors_available() -> None:
    """transformers 5 made safetensors a hard dependency and removed
    ``transformers.utils.is_safetensors_available``; XTuner 0.2.0 imports it in
    ``xtuner/utils/handle_moe_load_and_save.py``, which ``xtuner.utils`` imports, so every
    ``xtuner.*`` import failed with ``cannot import name 'is_safetensors_available'``.
    Restore it, returning True (safetensors is installed whenever transformers 5 is)."""
    import transformers.utils

    if hasattr(transformers.utils, 'is_safetensors_available'):
        return

    def is_safetensors_available() -> bool:
        return True

    is_safetensors_available.mllm_compat = True
    transformers.utils.is_safetensors_available = is_safetensors_available


class _RemovedDeepSpeedOptimizer:
    """Stands in for an optimizer that DeepSpeed no longer ships; building it fails."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f'{type(self).__name__} was removed from DeepSpeed in 0.19.8 '
                           '(deepspeed.runtime.fp16.onebit); use another optimizer')


def deepspeed_onebit_optimizers() -> None:
    """DeepSpeed 0.19.8 removed ``deepspeed.runtime.fp16.onebit`` (the 1-bit Adam/LAMB and
    0/1 Adam optimizers). MMEngine 0.10.7's ``DeepSpeedStrategy.__init__`` calls
    ``register_deepspeed_optimizers``, which imports ``OnebitAdam``, ``OnebitLamb`` and
    ``ZeroOneAdam`` from there, so every DeepSpeed run failed with ModuleNotFoundError.
    Provide that module with the three names as classes that refuse to be built (with the
    reason): MMEngine registers them as before and everything else is untouched. Checked on
    disk, without importing DeepSpeed (seconds); a no-op where the module exists or
    DeepSpeed is not installed."""
    name = 'deepspeed.runtime.fp16.onebit'
    if name in sys.modules:
        return
    spec = importlib.util.find_spec('deepspeed')  # top-level: does not import it
    if spec is None or not spec.submodule_search_locations:
        return
    package = list(spec.submodule_search_locations)[0]
    if osp.exists(osp.join(package, 'runtime', 'fp16', 'onebit')):
        return
    module = types.ModuleType(name, 'mllm.engine.compat: DeepSpeed >= 0.19.8 has no 1-bit '
                              'optimizers; these names refuse to be built.')
    for cls_name in ('OnebitAdam', 'OnebitLamb', 'ZeroOneAdam'):
        setattr(module, cls_name, type(cls_name, (_RemovedDeepSpeedOptimizer, ),
                                       {'__module__': name}))
    module.mllm_compat = True
    sys.modules[name] = module


PATCHES = (transformers_is_safetensors_available, deepspeed_onebit_optimizers)


def apply_all() -> None:
    """Apply every patch (idempotent); call before importing ``xtuner`` or building a
    DeepSpeed strategy."""
    for patch in PATCHES:
        patch()
