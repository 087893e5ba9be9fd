"""MG-LLaVA (seed 002): low-resolution CLIP + high-resolution ConvNeXt fused by a Conv-Gate,
plus object tokens pooled from the ConvNeXt's stage maps.

Per image the LLM sees ``[fused grid tokens][one token per box]`` in the slots of its
``<image>`` placeholder; the dataset reserves ``grid tokens + number of boxes`` slots.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from mllm.models.llava import LLaVAModel, set_trainable
from mllm.models.object_tokens import pool_box_features
from mllm.registry import MODELS


@MODELS.register_module()
class MGLLaVAModel(LLaVAModel):
    """LLaVA with a high-resolution ConvNeXt branch, Conv-Gate fusion and object tokens.

    The image tensor is the high-resolution one (768 px for MG-LLaVA); the CLIP branch gets
    it bilinearly downsampled to ``grid x patch`` pixels, where ``grid`` is the ConvNeXt's
    token grid, so the two grids always match (768 / 32 = 24 -> 24 x 14 = 336 px).

    Args:
        llm, vision_encoder, projector, lora, gradient_checkpointing: as ``LLaVAModel``;
            ``vision_encoder`` is the low-resolution CLIP ViT (patch features).
        high_res_encoder: ``ConvNeXtEncoder`` config (MG-LLaVA: open_clip
            ``convnext_large_d_320``).
        fusion: fusion config; channels are filled in. Defaults to ``ConvGateFusion``.
        bbox_projector: object-token projector config, ``sum(stage channels) -> LLM width``
            (2880 -> H for ConvNeXt-L). Defaults to ``mlp2x_gelu``.
        box_pool_size: RoIAlign samples per side. Defaults to 56 (MG-LLaVA).
        box_grid_stage: the stage whose grid all stage maps are resized to before RoIAlign.
            Defaults to 0 (the finest, MG-LLaVA).
        trainable: parameter-name prefixes that train; MG-LLaVA pretraining trains
            ``('projector', 'bbox_projector', 'fusion')``.
    """

    def __init__(self,
                 llm: dict,
                 vision_encoder: dict,
                 high_res_encoder: dict,
                 projector: dict = dict(type='MLPProjector', depth=2),
                 fusion: dict = dict(type='ConvGateFusion'),
                 bbox_projector: dict = dict(type='MLPProjector', depth=2),
                 box_pool_size: int = 56,
                 box_grid_stage: int = 0,
                 trainable: Sequence[str] = ('projector', 'bbox_projector', 'fusion'),
                 lora: Optional[dict] = None,
                 gradient_checkpointing: bool = False,
                 answer_only_last_layer: bool = True,
                 fused_elementwise: bool = False,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        # the base class freezes everything (trainable=()); the trainable set is applied
        # below, once the parts it may name exist
        super().__init__(llm, vision_encoder, projector=projector, trainable=(), lora=lora,
                         gradient_checkpointing=gradient_checkpointing,
                         answer_only_last_layer=answer_only_last_layer,
                         fused_elementwise=fused_elementwise,
                         data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if getattr(self.vision_encoder, 'select_feature', 'patch') != 'patch':
            raise ValueError("MGLLaVAModel fuses patch grids: the vision encoder needs "
                             "select_feature='patch'")
        self.high_res_encoder = MODELS.build(high_res_encoder)
        self.fusion = MODELS.build(fusion, default_args=dict(
            low_channels=self.vision_encoder.out_channels,
            high_channels=self.high_res_encoder.out_channels))
        self.bbox_projector = MODELS.build(bbox_projector, default_args=dict(
            in_channels=sum(self.high_res_encoder.stage_channels),
            out_channels=self.llm.config.hidden_size))
        self.box_pool_size = box_pool_size
        self.box_grid_stage = box_grid_stage
        set_trainable(self, trainable)
        if gradient_checkpointing:
            self.high_res_encoder.set_grad_checkpointing(True)

    def num_visual_tokens(self, unit_size) -> int:
        """Grid tokens for a high-resolution tensor of ``unit_size`` = (W, H); each box adds one."""
        return self.high_res_encoder.num_visual_tokens(unit_size)

    def dummy_pixel_values(self, device) -> torch.Tensor:
        """A blank image for ranks whose batch has no image, so both branches, the fusion and
        the bbox projector still run (ZeRO-3, DDP). Its size makes the CLIP input the ViT's
        native size (768 px for 336 / 14 x 32): any other size interpolates the position
        embedding, which reads the weight outside the module call ZeRO-3 gathers it for."""
        config = self.vision_encoder.model.config
        side = config.image_size // config.patch_size * self.high_res_encoder.stride
        return torch.zeros(1, 3, side, side, device=device)

    def low_res_size(self, high_res_size) -> tuple:
        """(H, W) of the CLIP input for a high-resolution tensor of (H, W) pixels."""
        stride, patch = self.high_res_encoder.stride, self.vision_encoder.patch_size
        return tuple(-(-side // stride) * patch for side in high_res_size)

    def _encode_same_shape(self, pixel_values: torch.Tensor,
                           boxes: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """(B, 3, H, W) + B box tensors (xyxy pixels of the image tensor; None: no boxes) ->
        B tensors (N + n_i, C_llm): per image its grid tokens, then its box tokens."""
        if boxes is None:
            boxes = [torch.zeros(0, 4) for _ in range(len(pixel_values))]
        low_pixels = F.interpolate(pixel_values, size=self.low_res_size(pixel_values.shape[-2:]),
                                   mode='bilinear', align_corners=False)
        low = self.vision_encoder(low_pixels)  # (B, N, Cl)
        _, stage_maps = self.high_res_encoder(pixel_values, return_stages=True)
        high = stage_maps[-1]  # (B, Ch, h, w)
        b, _, h, w = high.shape
        low_map = low.transpose(1, 2).reshape(b, -1, h, w)
        fused = self.fusion(low_map, high).flatten(2).transpose(1, 2)  # (B, N, Cl)
        grid_tokens = self.projector(fused, grid_size=(h, w))  # (B, N, C_llm)
        stride = pixel_values.shape[-1] / stage_maps[self.box_grid_stage].shape[-1]
        box_feats = pool_box_features(stage_maps, boxes, stride=stride,
                                      pool_size=self.box_pool_size, grid_stage=self.box_grid_stage)
        # one projector call for the whole batch, even with no box at all: every rank then
        # uses bbox_projector's parameters (DDP / ZeRO-3 wait for them)
        counts = [len(f) for f in box_feats]
        box_tokens = self.bbox_projector(torch.cat(box_feats).to(grid_tokens.dtype))
        return [torch.cat([g, t]) for g, t in zip(grid_tokens, box_tokens.split(counts))]
