"""A config's model on the meta device: shapes and names without reading any weights
(seconds, even for 34B). Used by ``mllm inspect``, the memory planner and the importer."""
import torch


def _without_weights(component: dict) -> dict:
    component = dict(component)
    component['load_weights'] = False
    component.pop('quantization', None)  # the meta device needs no real quantized storage
    return component


def build_on_meta(cfg):
    """The config's model on the meta device, without reading any weights (seconds, even
    for 34B)."""
    from mllm.registry import MODELS

    model_cfg = cfg.model.copy()
    for key in ('llm', 'vision_encoder', 'high_res_encoder'):
        if key in model_cfg:
            model_cfg[key] = _without_weights(model_cfg[key])
    with torch.device('meta'):
        return MODELS.build(model_cfg)
