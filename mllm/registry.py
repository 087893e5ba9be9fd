"""mllm's registries: children of MMEngine's root registries.

Each child lists the modules (``locations``) whose import registers its members, so
building a ``type`` name imports the module that defines it; nothing relies on import
side effects elsewhere. Configs set
``default_scope = 'mllm'`` so a bare name like ``'LLaVAModel'`` is looked up here first
and then in MMEngine's root registry.
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

# Models and their parts: vision encoders, projectors, the composed multimodal models.
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mllm', locations=['mllm.models'])
# Model wrappers (DDP that also works on CPU).
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope='mllm',
                          locations=['mllm.engine.model_wrappers'])
# Datasets in the LLaVA JSON format and the synthetic demo set.
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='mllm', locations=['mllm.datasets'])
# Image processors (pad/resize/normalise).
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='mllm',
                      locations=['mllm.datasets'])
# Samplers, e.g. the length-grouped sampler.
DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS, scope='mllm',
                         locations=['mllm.datasets.samplers'])
# Collate functions.
FUNCTIONS = Registry('function', parent=MMENGINE_FUNCTIONS, scope='mllm', locations=['mllm.datasets'])
# Training loops.
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope='mllm', locations=['mllm.engine.loops'])
# Hooks: trainable-only checkpoints, throughput logging.
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mllm', locations=['mllm.engine.hooks'])
# Optimizers and schedulers are MMEngine's (the empty children only let the 'mllm' scope
# resolve to them without a warning); optimizer wrappers add the non-finite-step skip.
OPTIMIZERS = Registry('optimizer', parent=MMENGINE_OPTIMIZERS, scope='mllm')
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mllm',
                          locations=['mllm.engine.optim_wrappers'])
PARAM_SCHEDULERS = Registry('parameter scheduler', parent=MMENGINE_PARAM_SCHEDULERS, scope='mllm')
