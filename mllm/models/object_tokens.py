"""Object tokens: one LLM token per detected box, pooled from a ConvNeXt's stage maps.

MG-LLaVA (seed 002) brings every ConvNeXt stage map to the grid of the finest one (bilinear;
192 + 384 + 768 + 1536 = 2880 channels for ConvNeXt-L), RoIAligns each box on that
multi-level map (56 x 56 samples), mean-pools the samples and projects the 2880-vector to the
LLM width with ``bbox_projector``. The box tokens follow the image's fused tokens in the text.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F


def multi_level_map(stage_maps: Sequence[torch.Tensor], grid_stage: int = 0) -> torch.Tensor:
    """Stage maps (B, C_i, h_i, w_i) resized (bilinear) to stage ``grid_stage``'s grid and
    concatenated: (B, sum C_i, h, w)."""
    size = stage_maps[grid_stage].shape[-2:]
    return torch.cat([m if m.shape[-2:] == size else
                      F.interpolate(m.float(), size=size, mode='bilinear', align_corners=False)
                      for m in stage_maps], dim=1)


def pool_box_features(stage_maps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                      stride: int, pool_size: int = 56, grid_stage: int = 0) -> List[torch.Tensor]:
    """Per image, a (n_i, sum C_i) feature for each of its boxes.

    Args:
        stage_maps: the encoder's stage maps for a batch of B images.
        boxes: B tensors (n_i, 4), xyxy in pixels of the encoder's input tensor (n_i may be 0).
        stride: input pixels per cell of stage ``grid_stage``'s map (4 for a ConvNeXt stem).
        pool_size: RoIAlign samples per side (MG-LLaVA: 56).
        grid_stage: the stage whose grid the maps are brought to (MG-LLaVA: 0, the finest).

    Returns:
        B tensors (n_i, sum C_i), float32: the mean of the RoIAlign samples.
    """
    if len(boxes) != stage_maps[0].shape[0]:
        raise ValueError(f'{len(boxes)} box lists for a batch of {stage_maps[0].shape[0]} images')
    counts = [len(b) for b in boxes]
    channels = sum(m.shape[1] for m in stage_maps)
    device = stage_maps[0].device
    if not sum(counts):
        return [torch.zeros(0, channels, device=device) for _ in boxes]
    with_boxes = [i for i, n in enumerate(counts) if n]  # skip the big map for box-less images
    features = multi_level_map([m[with_boxes] for m in stage_maps], grid_stage).float()
    rois = [boxes[i].to(device=device, dtype=torch.float32).reshape(-1, 4) for i in with_boxes]
    # imported here: only MG-LLaVA needs torchvision (the GPU kit's image may lack it)
    from torchvision.ops import roi_align

    # aligned=False as MG-LLaVA trained its bbox projector with torchvision's default
    pooled = roi_align(features, rois, output_size=pool_size, spatial_scale=1.0 / stride,
                       sampling_ratio=-1, aligned=False).mean(dim=(2, 3))  # (sum n_i, C)
    per_image = iter(pooled.split([counts[i] for i in with_boxes]))
    return [next(per_image) if n else pooled.new_zeros(0, channels) for n in counts]
