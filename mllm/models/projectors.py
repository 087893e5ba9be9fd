"""Projectors: visual features (B, N, C_vision) -> LLM embeddings (B, N, C_llm)."""
from torch import nn

from mllm.registry import MODELS


@MODELS.register_module()
class MLPProjector(nn.Module):
    """LLaVA-1.5's ``mlpNx_gelu``: Linear, then (GELU, Linear) repeated ``depth - 1`` times.

    Layers are named ``linear_1``, ``act``, ``linear_2``, ... (the transformers LLaVA
    names) so state dicts carry no ``Sequential`` indices.

    Args:
        in_channels: width of the visual features (filled in by the composed model).
        out_channels: LLM hidden size (filled in by the composed model).
        depth: number of linear layers; 2 is ``mlp2x_gelu``. Defaults to 2.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f'MLPProjector depth must be >= 1, got {depth}')
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
