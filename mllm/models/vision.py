"""Vision encoders: images (B, 3, H, W) -> visual tokens (B, N, C).

Every encoder exposes ``out_channels`` and ``num_visual_tokens(image_size)`` so that
the composed model can size its projector and ``mllm inspect`` can count tokens
without running a forward pass.
"""
import inspect
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from mllm.hf_utils import from_pretrained_locally
from mllm.registry import MODELS


@MODELS.register_module()
class CLIPVisionEncoder(nn.Module):
    """CLIP ViT image tower (LLaVA's encoder): patch features from one hidden layer.

    Args:
        pretrained: HF id or local folder of a CLIP (vision) checkpoint. Defaults to None.
        config: ``CLIPVisionConfig`` fields; used when ``pretrained`` is None or
            ``load_weights`` is False (random init, or the meta device in ``mllm inspect``).
        load_weights: load ``pretrained`` weights. Defaults to True.
        select_layer: hidden layer whose output is used; -2 is LLaVA's penultimate layer.
        select_feature: 'patch' drops the CLS token, 'cls_patch' keeps it.
    """

    def __init__(self,
                 pretrained: Optional[str] = None,
                 config: Optional[dict] = None,
                 load_weights: bool = True,
                 select_layer: int = -2,
                 select_feature: str = 'patch'):
        super().__init__()
        if select_feature not in ('patch', 'cls_patch'):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        if pretrained is not None and load_weights:
            self.model = _clip_from_pretrained(pretrained)
        elif config is not None:
            self.model = CLIPVisionModel(CLIPVisionConfig(**config))
        elif pretrained is not None:
            self.model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(pretrained, local_files_only=True))
        else:
            raise ValueError('CLIPVisionEncoder needs `pretrained` or `config`')
        num_layers = self.model.config.num_hidden_layers
        if not -num_layers - 1 <= select_layer <= num_layers:
            raise ValueError(f'select_layer={select_layer} is out of range for {num_layers} layers')
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.grad_checkpointing = False
        self.loaded_pretrained = pretrained is not None and load_weights
        self._register_load_state_dict_pre_hook(_clip_keys_for_this_release, with_module=True)

    def weight_origin(self, key: str) -> str:
        """'pretrained' when the tower was read from ``pretrained``, else 'config' (random
        init the config asks for); see ``mllm.models.llava.weight_origin``."""
        return 'pretrained' if self.loaded_pretrained else 'config'

    @property
    def vision(self) -> nn.Module:
        """The transformer itself: ``CLIPVisionModel.vision_model`` up to transformers 4.x;
        transformers 5 dropped that wrapper (its modules sit on ``CLIPVisionModel``)."""
        return getattr(self.model, 'vision_model', self.model)

    @property
    def out_channels(self) -> int:
        return self.model.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def feature_grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) patch grid for an input of ``image_size`` = (W, H) pixels."""
        w, h = image_size
        return (h // self.patch_size, w // self.patch_size)

    def num_visual_tokens(self, image_size: Tuple[int, int]) -> int:
        """Tokens for an input tensor of ``image_size`` = (W, H) pixels."""
        w, h = image_size
        n = (w // self.patch_size) * (h // self.patch_size)
        return n + 1 if self.select_feature == 'cls_patch' else n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def num_used_layers(self) -> int:
        """Encoder layers up to ``select_layer`` (``hidden_states[0]`` is the embedding)."""
        num_layers = self.model.config.num_hidden_layers
        return self.select_layer % (num_layers + 1)

    def unused_parameters(self):
        """Parameters that never reach the output (layers after ``select_layer`` and the
        final LayerNorm): kept so checkpoints and counts match the published tower, but
        frozen, so DDP does not wait for gradients that never come."""
        vision = self.vision
        yield from vision.post_layernorm.parameters()
        for layer in vision.encoder.layers[self.num_used_layers:]:
            yield from layer.parameters()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.vision
        dtype = vision.embeddings.patch_embedding.weight.dtype
        # other input sizes (slices, keep-aspect) interpolate the position embedding (bicubic)
        interpolate = tuple(pixel_values.shape[-2:]) != (self.model.config.image_size,) * 2
        hidden = vision.pre_layrnorm(vision.embeddings(
            pixel_values.to(dtype), interpolate_pos_encoding=interpolate))  # (B, 1 + N, C)
        # run only the layers up to select_layer: the rest would be computed and discarded
        for layer in vision.encoder.layers[:self.num_used_layers]:
            if self.grad_checkpointing and self.training:
                hidden = checkpoint(_clip_layer, layer, hidden, use_reentrant=False)
            else:
                hidden = _clip_layer(layer, hidden)
        return hidden[:, 1:] if self.select_feature == 'patch' else hidden


def _clip_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` without masks: transformers 4.x takes (hidden, attention_mask,
    causal_attention_mask) and returns a tuple, 5.x takes (hidden, attention_mask) and
    returns the tensor."""
    if _CLIP_LAYER_TAKES_CAUSAL_MASK:
        return layer(hidden, None, None)[0]
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


_CLIP_LAYER_TAKES_CAUSAL_MASK = 'causal_attention_mask' in inspect.signature(
    CLIPEncoderLayer.forward).parameters


def _clip_keys_for_this_release(module, state_dict, prefix, *args) -> None:
    """State dicts name the tower's weights ``model.vision_model.*`` under transformers 4.x
    and ``model.*`` under 5.x (``CLIPVisionModel`` lost its ``vision_model`` wrapper):
    rename a checkpoint's keys to the running release's layout, so checkpoints written
    under either load."""
    wrapped, flat = prefix + 'model.vision_model.', prefix + 'model.'
    if hasattr(module.model, 'vision_model'):  # transformers 4.x
        for key in [k for k in state_dict if k.startswith(flat) and not k.startswith(wrapped)]:
            state_dict[wrapped + key[len(flat):]] = state_dict.pop(key)
    else:
        for key in [k for k in state_dict if k.startswith(wrapped)]:
            state_dict[flat + key[len(wrapped):]] = state_dict.pop(key)


def _clip_from_pretrained(pretrained: str) -> CLIPVisionModel:
    """``CLIPVisionModel`` weights from ``pretrained``, all of them: a folder whose weights
    do not cover the tower (a whole LLaVA model, another encoder) is an error naming the
    missing tensors, not a randomly initialised tower with a transformers warning."""
    import json
    import os

    config_path = os.path.join(pretrained, 'config.json')
    if os.path.isfile(config_path):
        with open(config_path) as f:
            architectures = json.load(f).get('architectures') or []
        whole = [a for a in architectures if 'Llava' in a or 'ForCausalLM' in a]
        if whole:
            raise ValueError(
                f'vision_encoder.pretrained={pretrained!r} is a whole {whole[0]} model, not a CLIP '
                'vision tower: import it with `mllm convert hf-to-pth CONFIG '
                f'{pretrained} OUT.pth` and train with --load-from OUT.pth, and point '
                'vision_encoder.pretrained at the CLIP the release names (e.g. '
                'openai/clip-vit-large-patch14-336)')
    model, info = from_pretrained_locally(CLIPVisionModel, pretrained, 'vision encoder',
                                          output_loading_info=True)
    missing = [k for k in info.get('missing_keys', ()) if not k.endswith('position_ids')]
    if missing or info.get('mismatched_keys'):
        raise ValueError(
            f'vision_encoder.pretrained={pretrained!r} does not hold the CLIP vision tower: '
            f'{len(missing)} of its tensors are missing ({", ".join(sorted(missing)[:4])}), '
            f'{len(info.get("mismatched_keys") or [])} have another shape; transformers would '
            'start them from random weights')
    return model

