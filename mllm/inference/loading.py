"""Build a model from its training config and load an ``iter_N.pth`` into it.

Shared by ``inference`` (chat, eval, demo) and ``export`` (``convert pth-to-hf``), which
both sit above it, so neither has to import the other.
"""
from typing import Dict, Optional

import torch


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """The model weights of an ``iter_N.pth``, loaded safely (``load_checkpoint_file``)."""
    return _load(path).get('state_dict')


def _load(path: str) -> dict:
    from mllm.engine.checkpoint import load_checkpoint_file
    checkpoint = load_checkpoint_file(path, map_location='cpu')
    if 'state_dict' not in checkpoint:
        checkpoint = dict(state_dict=checkpoint)
    return checkpoint


def load_model(cfg, checkpoint: Optional[str] = None):
    """Build ``cfg.model`` and load a (possibly trainable-only) checkpoint into it.

    Tensors a trainable-only checkpoint leaves out must be frozen ones, which keep the
    weights the model was built with; an imported release (``convert hf-to-pth``) may also
    leave out parts read from their ``pretrained`` files (the CLIP tower of an original
    LLaVA folder). Anything else missing is an error.
    """
    from mllm.models.llava import weight_origin
    from mllm.registry import MODELS

    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        loaded = _load(checkpoint)
        result = model.load_state_dict(loaded['state_dict'], strict=False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        imported = bool((loaded.get('meta') or {}).get('imported_from'))
        missing = [k for k in result.missing_keys if k not in frozen
                   and not (imported and weight_origin(model, k) == 'pretrained')]
        if missing or result.unexpected_keys:
            raise ValueError(f'{checkpoint} does not fit this model: missing {missing[:5]}, '
                             f'unexpected {result.unexpected_keys[:5]}')
    return model.eval()
