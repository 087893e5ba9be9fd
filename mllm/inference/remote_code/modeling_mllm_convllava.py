"""ConvLLaVA (a ConvNeXt vision tower, optionally with ConvLLaVA's 5th stage, + mlp2x_gelu
projector + a causal LLM) for plain transformers, written next to the weights by
``mllm convert pth-to-hf ... --format remote_code`` with ``modeling_mllm_common.py``:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder)  # transformers' own LlavaProcessor

Self-contained: it needs torch, transformers and, for the 'timm' / 'open_clip' trunks, timm
or open_clip; never mllm. Parameter names are mllm's (``vision_encoder.stem``,
``vision_encoder.stages.N``, ``vision_encoder.stage5``, ``projector.linear_1``, ``llm.*``),
so the weights are mllm's state dict as it is. The processor puts ``config.image_token_index``
once per visual token; ``forward`` scatters the image features into those positions.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .modeling_mllm_common import MllmForCausalLMBase


class MllmConvLlavaConfig(PretrainedConfig):
    """Args:
        text_config: the LLM's config (a dict with ``model_type``).
        vision_config: ``backend`` ('hf', 'timm' or 'open_clip'), ``hf_config`` (the 4-stage
            ``ConvNextConfig`` dict, 'hf'), ``model_name`` / ``model_kwargs`` ('timm',
            'open_clip') and ``extra_stage`` (``dict(channels, depth)`` or None).
        projector_depth: linear layers of the projector (2 = mlp2x_gelu).
        image_token_index: the id the processor puts once per visual token.
    """
    model_type = 'mllm_convllava'
    sub_configs = {'text_config': AutoConfig}

    def __init__(self, text_config=None, vision_config=None, projector_depth: int = 2,
                 image_token_index: Optional[int] = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.vision_config = dict(vision_config or {})
        self.projector_depth = projector_depth
        self.image_token_index = image_token_index
        super().__init__(**kwargs)


def _extra_stage(backend, hf_config, in_channels, channels, depth, conv_mlp):
    """ConvLLaVA's 5th stage (downsample k2 s2 + ConvNeXt blocks) in the trunk's block type."""
    if backend == 'hf':
        from transformers.models.convnext.modeling_convnext import ConvNextStage
        return ConvNextStage(hf_config, in_channels, channels, kernel_size=2, stride=2,
                             depth=depth)
    from timm.models.convnext import ConvNeXtStage, _get_norm_layers
    norm_layer, norm_layer_cl = _get_norm_layers(None, conv_mlp, None)
    return ConvNeXtStage(in_channels, channels, kernel_size=7, stride=2, depth=depth,
                         ls_init_value=1e-6, conv_mlp=conv_mlp, norm_layer=norm_layer,
                         norm_layer_cl=norm_layer_cl)


class ConvNeXtTower(nn.Module):
    """stem + 4 stages (+ stage5) of a ConvNeXt; tokens (B, N, C) of the last map."""

    def __init__(self, vision_config: dict):
        super().__init__()
        backend = vision_config['backend']
        hf_config = None
        if backend == 'hf':
            from transformers import ConvNextConfig, ConvNextModel
            hf_config = ConvNextConfig(**vision_config['hf_config'])
            trunk = ConvNextModel(hf_config)
            self.stem, self.stages = trunk.embeddings, trunk.encoder.stages
            channels = list(hf_config.hidden_sizes)
        else:
            if backend == 'timm':
                import timm
                trunk = timm.create_model(vision_config['model_name'], pretrained=False,
                                          num_classes=0, **(vision_config.get('model_kwargs') or {}))
            else:
                import open_clip
                trunk = open_clip.create_model(vision_config['model_name']).visual.trunk
            self.stem, self.stages = trunk.stem, trunk.stages
            channels = [stage.blocks[-1].conv_dw.out_channels for stage in self.stages]
        extra = vision_config.get('extra_stage')
        self.stage5 = None
        if extra:
            conv_mlp = backend != 'hf' and getattr(self.stages[-1].blocks[-1], 'use_conv_mlp',
                                                   False)
            self.stage5 = _extra_stage(backend, hf_config, channels[-1], extra['channels'],
                                       extra['depth'], conv_mlp)
            channels.append(extra['channels'])
        self.out_channels = channels[-1]
        self.stride = 4 * 2 ** (len(channels) - 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.forward_map(pixel_values)
        return hidden.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)

    def forward_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, C, h, w)."""
        pixels = pixel_values.to(next(self.stem.parameters()).dtype)
        h, w = pixels.shape[-2:]
        # right/bottom padding to a multiple of the stride, as the model trained
        pixels = F.pad(pixels, (0, -w % self.stride, 0, -h % self.stride))
        hidden = self.stem(pixels)
        stages: List[nn.Module] = list(self.stages) + ([self.stage5] if self.stage5 is not None else [])
        for stage in stages:
            hidden = stage(hidden)
        return hidden


class MLPProjector(nn.Module):
    """mlpNx_gelu with the layer names linear_1, act, linear_2, ..."""

    def __init__(self, in_channels: int, out_channels: int, depth: int):
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(in_channels, out_channels)
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f'linear_{i}', nn.Linear(out_channels, out_channels))

    def forward(self, x):
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f'linear_{i}')(self.act(x))
        return x


class MllmConvLlavaForCausalLM(MllmForCausalLMBase):
    config_class = MllmConvLlavaConfig
    base_model_prefix = 'mllm_convllava'

    def __init__(self, config: MllmConvLlavaConfig):
        super().__init__(config)
        self.vision_encoder = ConvNeXtTower(config.vision_config)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.projector = MLPProjector(self.vision_encoder.out_channels,
                                      config.text_config.hidden_size, config.projector_depth)
        self.post_init()

    def image_features(self, pixel_values):
        """(B, 3, H, W) -> (B * N, C_llm)."""
        return self.projector(self.vision_encoder(pixel_values)).flatten(0, 1)

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        return self.forward_llm(input_ids, pixel_values, inputs_embeds, {}, kwargs)
