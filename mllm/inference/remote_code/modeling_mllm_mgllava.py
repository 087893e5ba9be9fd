"""MG-LLaVA (low-resolution CLIP + high-resolution ConvNeXt, Conv-Gate fusion, mlp2x_gelu
projector, a causal LLM) for plain transformers, written next to the weights by
``mllm convert pth-to-hf ... --format remote_code`` together with
``modeling_mllm_convllava.py`` (the ConvNeXt tower and projector, imported from there) and
``modeling_mllm_common.py``:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=image, text=text, boxes=[[x1, y1, x2, y2], ...],
                       return_tensors='pt')
    model.generate(**inputs, max_new_tokens=32)

Needs torch, transformers, timm / open_clip and, for object boxes, torchvision (``roi_align``;
timm needs it anyway); never mllm. Parameter names are mllm's. The image tensor is the
high-resolution one; the CLIP branch sees it bilinearly downsampled so both grids match.

Object tokens: ``processor(..., boxes=)`` takes xyxy boxes in pixels of each original image
(one list per image), clips them, drops empty ones, maps them through the processor's padding
and resizing, reserves one more image token per box after the image's grid tokens and returns
them as ``bboxes``; ``forward`` / ``generate`` pool each box from the ConvNeXt's stage maps
(RoIAlign, mean) through ``bbox_projector``, as mllm does. Called without boxes, the
processor is transformers' ``LlavaProcessor`` (which ``AutoProcessor`` gives without
``trust_remote_code``) and the model sees the fused grid tokens only, as mllm does for an
image without boxes.
"""
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlavaProcessor, PretrainedConfig

from .modeling_mllm_common import CLIPTower, MllmForCausalLMBase
from .modeling_mllm_convllava import ConvNeXtTower, MLPProjector


class MllmMgLlavaConfig(PretrainedConfig):
    """Args:
        text_config: the LLM's config (a dict with ``model_type``).
        clip_config: ``CLIPVisionConfig`` fields of the low-resolution branch.
        select_layer: the CLIP hidden layer used (patch tokens, CLS dropped).
        vision_config: the high-resolution ConvNeXt (``modeling_mllm_convllava``'s form).
        gate_channels: hidden width of the fusion gate.
        projector_depth, bbox_projector_depth: linear layers of the projectors.
        bbox_in_channels: the summed stage channels a box feature has.
        box_pool_size: RoIAlign samples per side (None in folders exported before boxes were
            supported: boxes are then refused, not pooled with a guess).
        box_grid_stage: the stage whose grid every stage map is resized to for RoIAlign.
        image_token_index: the id the processor puts once per visual token.
    """
    model_type = 'mllm_mgllava'
    sub_configs = {'text_config': AutoConfig}

    def __init__(self, text_config=None, clip_config=None, select_layer: int = -2,
                 vision_config=None, gate_channels: int = None, projector_depth: int = 2,
                 bbox_projector_depth: int = 2, bbox_in_channels: int = None,
                 box_pool_size: int = None, box_grid_stage: int = None,
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
        self.box_pool_size = box_pool_size
        self.box_grid_stage = box_grid_stage
        self.image_token_index = image_token_index
        super().__init__(**kwargs)


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


def _stage_maps(tower: ConvNeXtTower, pixel_values: torch.Tensor) -> List[torch.Tensor]:
    """Every stage's map of ``ConvNeXtTower`` (its ``forward_map`` is the last of them)."""
    pixels = pixel_values.to(next(tower.stem.parameters()).dtype)
    h, w = pixels.shape[-2:]
    pixels = F.pad(pixels, (0, -w % tower.stride, 0, -h % tower.stride))
    hidden, maps = tower.stem(pixels), []
    for stage in list(tower.stages) + ([tower.stage5] if tower.stage5 is not None else []):
        hidden = stage(hidden)
        maps.append(hidden)
    return maps


def pool_box_features(stage_maps, boxes, stride: float, pool_size: int,
                      grid_stage: int) -> List[torch.Tensor]:
    """Per image a (n_i, sum C) float32 feature per box: the stage maps resized (bilinear) to
    stage ``grid_stage``'s grid and concatenated, RoIAligned (``aligned=False``) and
    mean-pooled; ``boxes`` are xyxy pixels of the encoder's input."""
    counts = [len(b) for b in boxes]
    channels = sum(m.shape[1] for m in stage_maps)
    device = stage_maps[0].device
    if not sum(counts):
        return [torch.zeros(0, channels, device=device) for _ in boxes]
    with_boxes = [i for i, n in enumerate(counts) if n]
    maps = [m[with_boxes] for m in stage_maps]
    size = maps[grid_stage].shape[-2:]
    features = torch.cat([m if m.shape[-2:] == size else
                          F.interpolate(m.float(), size=size, mode='bilinear', align_corners=False)
                          for m in maps], dim=1).float()
    rois = [boxes[i].to(device=device, dtype=torch.float32).reshape(-1, 4) for i in with_boxes]
    from torchvision.ops import roi_align

    pooled = roi_align(features, rois, output_size=pool_size, spatial_scale=1.0 / stride,
                       sampling_ratio=-1, aligned=False).mean(dim=(2, 3))
    per_image = iter(pooled.split([counts[i] for i in with_boxes]))
    return [next(per_image) if n else pooled.new_zeros(0, channels) for n in counts]


def _as_box_lists(bboxes, num_images: int) -> List[torch.Tensor]:
    """One (n_i, 4) tensor per image from a list of them, or from one (n, 4) / (B, n, 4)
    tensor."""
    if isinstance(bboxes, torch.Tensor):
        bboxes = [bboxes] if bboxes.dim() == 2 else list(bboxes)
    bboxes = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in bboxes]
    if len(bboxes) != num_images:
        raise ValueError(f'{num_images} images but {len(bboxes)} box lists')
    return bboxes


class MllmMgLlavaProcessor(LlavaProcessor):
    """transformers' ``LlavaProcessor`` that also takes object boxes: ``boxes`` is one list
    of xyxy boxes (pixels of the original image) per image, in image order (a single image
    may take its (n, 4) list directly). Each box is clipped to its image (empty ones are
    dropped, as mllm does), mapped through the padding to a square and the resize, and
    reserves one more image token after the image's grid tokens; ``bboxes`` (one (n_i, 4)
    tensor per image) goes to the model. Order and cap the boxes before (mllm keeps the
    best-scoring ``max_boxes``)."""

    _box_counts: Optional[List[int]] = None

    def __call__(self, images=None, text=None, boxes=None, **kwargs):
        if boxes is None:
            return super().__call__(images=images, text=text, **kwargs)
        if images is None:
            raise ValueError('boxes were given without images')
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        # (W, H): a PIL image's size, or an (H, W, C) array's
        sizes = [i.size if isinstance(i, Image.Image) else np.asarray(i).shape[1::-1]
                 for i in flat]
        if len(flat) == 1 and torch.as_tensor(boxes, dtype=torch.float32).dim() == 2:
            boxes = [boxes]
        if len(boxes) != len(flat):
            raise ValueError(f'{len(flat)} images but {len(boxes)} box lists')
        mapped = [self.map_boxes(b, size) for b, size in zip(boxes, sizes)]
        self._box_counts = [len(b) for b in mapped]
        try:
            inputs = super().__call__(images=images, text=text, **kwargs)
        finally:
            self._box_counts = None
        inputs['bboxes'] = mapped
        return inputs

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        grid = super().replace_image_token(image_inputs, image_idx, **kwargs)
        return grid + self.image_token * (self._box_counts[image_idx] if self._box_counts else 0)

    def map_boxes(self, boxes, image_size) -> torch.Tensor:
        """xyxy boxes of an image of ``image_size`` = (W, H) -> the kept ones, in pixels of
        the processed image (mllm's ``select_boxes`` + ``LLaVAImageProcessor.map_boxes``)."""
        w, h = image_size
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        wide = boxes.to(torch.float64)
        boxes = torch.stack([wide[:, 0].clamp(0, w), wide[:, 1].clamp(0, h),
                             wide[:, 2].clamp(0, w), wide[:, 3].clamp(0, h)], dim=1).float()
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if self.image_processor.do_pad:
            side = max(w, h)  # the image sits at ((side - w) // 2, (side - h) // 2)
            boxes = boxes + torch.tensor([(side - w) // 2, (side - h) // 2] * 2,
                                         dtype=torch.float32)
            w = h = side
        size = self.image_processor.size
        return boxes * torch.tensor([size['width'] / w, size['height'] / h] * 2)


class MllmMgLlavaForCausalLM(MllmForCausalLMBase):
    config_class = MllmMgLlavaConfig
    base_model_prefix = 'mllm_mgllava'

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

    def image_features(self, pixel_values, bboxes=None):
        """(B, 3, H, W) high-resolution images -> (sum N + n_i, C_llm): per image its fused
        grid tokens, then one token per box of ``bboxes`` (xyxy pixels of ``pixel_values``)."""
        stride = self.high_res_encoder.stride
        patch = self.vision_encoder.model.config.patch_size
        low_size = tuple(-(-side // stride) * patch for side in pixel_values.shape[-2:])
        low = self.vision_encoder(F.interpolate(pixel_values, size=low_size, mode='bilinear',
                                                align_corners=False))  # (B, N, Cl)
        maps = _stage_maps(self.high_res_encoder, pixel_values)
        high = maps[-1]  # (B, Ch, h, w)
        b, _, h, w = high.shape
        fused = self.fusion(low.transpose(1, 2).reshape(b, -1, h, w), high)
        grid_tokens = self.projector(fused.flatten(2).transpose(1, 2))  # (B, N, C)
        if bboxes is None:
            return grid_tokens.flatten(0, 1)
        if self.config.box_pool_size is None or self.config.box_grid_stage is None:
            raise ValueError('this folder records no box settings (box_pool_size, box_grid_stage '
                             'in config.json): it was exported before object boxes were '
                             'supported; export it again with `mllm convert pth-to-hf ... '
                             '--format remote_code`')
        grid_stage = self.config.box_grid_stage
        box_feats = pool_box_features(maps, _as_box_lists(bboxes, b),
                                      stride=pixel_values.shape[-1] / maps[grid_stage].shape[-1],
                                      pool_size=self.config.box_pool_size, grid_stage=grid_stage)
        box_tokens = self.bbox_projector(torch.cat(box_feats).to(grid_tokens.dtype))
        box_tokens = box_tokens.split([len(f) for f in box_feats])
        return torch.cat([torch.cat([g, t]) for g, t in zip(grid_tokens, box_tokens)])

    def forward(self, input_ids=None, pixel_values=None, bboxes=None, inputs_embeds=None,
                **kwargs):
        """``bboxes``: one (n_i, 4) tensor of xyxy pixels of ``pixel_values`` per image (the
        processor's), or None; generate passes them again at later steps, without images."""
        return self.forward_llm(input_ids, pixel_values, inputs_embeds, dict(bboxes=bboxes),
                                kwargs)
