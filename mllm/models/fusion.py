"""Fusion of a low-resolution and a high-resolution feature map (MG-LLaVA's Conv-Gate).

MG-LLaVA (seed 002; Zhao et al. 2024, "MG-LLaVA: Towards Multi-Granularity Visual
Instruction Tuning") adds a high-resolution ConvNeXt branch to LLaVA's CLIP ViT and fuses
the two maps per image before the projector::

    Hh = proj_h(GELU(conv1x1_h(E_high)))          proj_h zero-initialised
    Ll = E_low + proj_l(GELU(dwconv7x7(E_low)))    proj_l zero-initialised
    g  = MLP(2 Cl -> Cl / 2 -> 1)(mean_pool(cat[Ll, Hh]))   one scalar per image
    F  = Ll + Hh * tanh(g)

At initialisation ``Hh`` and the residual of ``Ll`` are exactly zero, so ``F == E_low`` and
the model starts as the plain LLaVA it extends.
"""
import torch
import torch.nn.functional as F
from torch import nn

from mllm.registry import MODELS


@MODELS.register_module()
class ConvGateFusion(nn.Module):
    """Conv-Gate fusion: ``fusion(low, high)`` with low (B, Cl, h, w), high (B, Ch, h, w)
    -> (B, Cl, h, w).

    Args:
        low_channels: channels of the low-resolution map (CLIP ViT-L: 1024).
        high_channels: channels of the high-resolution map (ConvNeXt-L stage 4: 1536).
        gate_channels: hidden width of the gate MLP. Defaults to ``low_channels // 2``
            (512 for ViT-L, as MG-LLaVA).
        resize_high: when the grids differ, resize the high-resolution map to the low one
            (bilinear) instead of raising. Defaults to False: a grid mismatch usually means
            the image sizes of the two branches are misconfigured.
    """

    def __init__(self, low_channels: int, high_channels: int, gate_channels: int = None,
                 resize_high: bool = False):
        super().__init__()
        gate_channels = gate_channels or max(low_channels // 2, 1)
        self.conv_high = nn.Conv2d(high_channels, high_channels, 1)
        self.proj_high = nn.Conv2d(high_channels, low_channels, 1)
        self.dwconv_low = nn.Conv2d(low_channels, low_channels, 7, padding=3, groups=low_channels)
        self.proj_low = nn.Conv2d(low_channels, low_channels, 1)
        self.gate = nn.Sequential(nn.Linear(2 * low_channels, gate_channels), nn.GELU(),
                                  nn.Linear(gate_channels, 1))
        self.resize_high = resize_high
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv_high, self.dwconv_low):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        # zero projections: the fused map equals the low-resolution map at initialisation
        for proj in (self.proj_high, self.proj_low):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if low.shape[-2:] != high.shape[-2:]:
            if not self.resize_high:
                raise ValueError(
                    f'ConvGateFusion: the low-resolution grid {tuple(low.shape[-2:])} differs '
                    f'from the high-resolution grid {tuple(high.shape[-2:])}; match the image '
                    'sizes of the two branches (e.g. 336 / 14 = 768 / 32 = 24) or set '
                    'resize_high=True')
            high = F.interpolate(high, size=low.shape[-2:], mode='bilinear', align_corners=False)
        high = self.proj_high(F.gelu(self.conv_high(high.to(low.dtype))))  # (B, Cl, h, w)
        low = low + self.proj_low(F.gelu(self.dwconv_low(low)))
        gate = self.gate(torch.cat([low, high], dim=1).mean(dim=(2, 3)))  # (B, 1)
        return low + high * gate.tanh()[:, :, None, None]
