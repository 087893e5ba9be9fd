"""MG-LLaVA (low-resolution CLIP + high-resolution ConvNeXt, Conv-Gate fusion, mlp2x_gelu
projector, a causal LLM) for plain transformers, written next to the weights by
``mllm convert pth-to-hf ... --format remote_code`` together with
``modeling_mllm_convllava.py`` (the ConvNeXt tower and projector, imported from there):

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder)  # transformers' own LlavaProcessor

Needs torch, transformers and timm / open_clip; never mllm. Parameter names are mllm's. The
image tensor is the high-resolution one; the CLIP branch sees it bilinearly downsampled so
both grids match. Object tokens (one per detector box) are not supported here: the model sees
the fused grid tokens only (``bbox_projector`` is loaded but unused), as mllm does for an
image without boxes.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel,
                          PretrainedConfig, PreTrainedModel)
from transformers.generation import GenerationMixin

from .modeling_mllm_convllava import ConvNeXtTower, MLPProjector


class MllmMgLlavaConfig(PretrainedConfig):
    """Args:
        text_config: the LLM's config (a dict with ``model_type``).
        clip_config: ``CLIPVisionConfig`` fields of the low-resolution branch.
        select_layer: the CLIP hidden layer used (patch tokens, CLS dropped).
        vision_config: the high-resolution ConvNeXt (``modeling_mllm_convllava``'s form).
        gate_channels: hidden width of the fusion gate.
        projector_depth, bbox_projector_depth: linear layers of the projectors.
        image_token_index: the id the processor puts once per visual token.
    """
    model_type = 'mllm_mgllava'
    sub_configs = {'text_config': AutoConfig}

    def __init__(self, text_config=None, clip_config=None, select_layer: int = -2,
                 vision_config=None, gate_channels: int = None, projector_depth: int = 2,
                 bbox_projector_depth: int = 2, bbox_in_channels: int = None,
                 image_token_index: int = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.clip_config = dict(clip_config or {})
        self.select_layer = select_layer
        self.vision_config = dict(vision_config or {})
        self.gate_channels = gate_channels
        self.projector_depth = projector_depth
        self.bbox_projector_depth = bbox_projector_depth
        self.bbox_in_channels = bbox_in_channels
        self.image_token_index = image_token_index
        super().__init__(**kwargs)


class CLIPTower(nn.Module):
    """CLIP ViT patch features (CLS dropped) of hidden layer ``select_layer``."""

    def __init__(self, clip_config: dict, select_layer: int):
        super().__init__()
        self.model = CLIPVisionModel(CLIPVisionConfig(**clip_config))
        self.select_layer = select_layer

    def forward(self, pixel_values):
        image_size = self.model.config.image_size
        out = self.model(pixel_values, output_hidden_states=True,
                         interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != (image_size,) * 2)
        return out.hidden_states[self.select_layer][:, 1:]


class ConvGateFusion(nn.Module):
    """MG-LLaVA's Conv-Gate: F = Ll + Hh * tanh(g) per image."""

    def __init__(self, low_channels: int, high_channels: int, gate_channels: int):
        super().__init__()
        self.conv_high = nn.Conv2d(high_channels, high_channels, 1)
        self.proj_high = nn.Conv2d(high_channels, low_channels, 1)
        self.dwconv_low = nn.Conv2d(low_channels, low_channels, 7, padding=3, groups=low_channels)
        self.proj_low = nn.Conv2d(low_channels, low_channels, 1)
        self.gate = nn.Sequential(nn.Linear(2 * low_channels, gate_channels), nn.GELU(),
                                  nn.Linear(gate_channels, 1))

    def forward(self, low, high):
        high = self.proj_high(F.gelu(self.conv_high(high.to(low.dtype))))  # (B, Cl, h, w)
        low = low + self.proj_low(F.gelu(self.dwconv_low(low)))
        gate = self.gate(torch.cat([low, high], dim=1).mean(dim=(2, 3)))  # (B, 1)
        return low + high * gate.tanh()[:, :, None, None]


class MllmMgLlavaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MllmMgLlavaConfig
    base_model_prefix = 'mllm_mgllava'
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: MllmMgLlavaConfig):
        super().__init__(config)
        self.vision_encoder = CLIPTower(config.clip_config, config.select_layer)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        hidden = config.text_config.hidden_size
        low_channels = self.vision_encoder.model.config.hidden_size
        self.projector = MLPProjector(low_channels, hidden, config.projector_depth)
        self.high_res_encoder = ConvNeXtTower(config.vision_config)
        self.fusion = ConvGateFusion(low_channels, self.high_res_encoder.out_channels,
                                     config.gate_channels or max(low_channels // 2, 1))
        self.bbox_projector = MLPProjector(config.bbox_in_channels, hidden,
                                           config.bbox_projector_depth)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def image_features(self, pixel_values):
        """(B, 3, H, W) high-resolution images -> (B * h * w, C_llm) fused grid tokens."""
        stride = self.high_res_encoder.stride
        patch = self.vision_encoder.model.config.patch_size
        low_size = tuple(-(-side // stride) * patch for side in pixel_values.shape[-2:])
        low = self.vision_encoder(F.interpolate(pixel_values, size=low_size, mode='bilinear',
                                                align_corners=False))  # (B, N, Cl)
        high = self.high_res_encoder.forward_map(pixel_values)  # (B, Ch, h, w)
        b, _, h, w = high.shape
        fused = self.fusion(low.transpose(1, 2).reshape(b, -1, h, w), high)
        return self.projector(fused.flatten(2).transpose(1, 2)).flatten(0, 1)

    def embed_inputs(self, input_ids, pixel_values=None):
        image_mask = input_ids == self.config.image_token_index  # (B, T)
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            return inputs_embeds
        feats = self.image_features(pixel_values)
        if feats.shape[0] != int(image_mask.sum()):
            raise ValueError(f'image features and image tokens do not match: tokens '
                             f'{int(image_mask.sum())}, features {feats.shape[0]}')
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1),
                                            feats.to(inputs_embeds.dtype))

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        """The LLM's forward on the merged embeddings; every other argument (attention mask,
        cache, labels, ...) goes to it as is."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        return self.llm(inputs_embeds=inputs_embeds, **kwargs)
