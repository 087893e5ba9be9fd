"""Projectors: visual features (B, N, C_vision) -> LLM embeddings (B, N', C_llm).

Every projector takes ``forward(x, grid_size=None)``: the (h, w) feature grid of the
image, which the resampler needs for non-square slices and the MLP ignores.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
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

    def forward(self, x, grid_size=None):
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f'linear_{i}')(self.act(x))
        return x


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, embed_dim), as LLaVA-UHD's
    release builds it (MAE's ``get_2d_sincos_pos_embed``): the first half of the channels
    encodes the column, the second the row (MAE's ``meshgrid`` puts w first), each half
    [sin | cos]; float32 throughout, like the release's numpy code."""
    if embed_dim % 4:
        raise ValueError(f'embed_dim must be a multiple of 4 for 2-D sin-cos, got {embed_dim}')

    def encode(positions, dim):  # (P,) -> (P, dim)
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0))
        angles = positions.float()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (h*w,) row of each cell
    cols = torch.arange(grid_w).repeat(grid_h)             # (h*w,) column of each cell
    return torch.cat([encode(cols, embed_dim // 2), encode(rows, embed_dim // 2)], 1)


@MODELS.register_module()
class Resampler(nn.Module):
    """LLaVA-UHD's perceiver resampler (seed 003): ``num_queries`` learnable queries attend
    once over a slice's features, so every slice becomes the same number of tokens.

    The 2-D sin-cos position embedding of the query grid (8 x 8 for 64 queries) is added to
    the queries as is and to the keys interpolated (bicubic) to the slice's feature grid,
    as the seed's ``forward(x, tgt_size)`` does. Parameter names and defaults are the
    release's (thunlp/LLaVA-UHD ``resampler.py``, docs/uhd.md): on the same weights the
    outputs match it (tests/test_uhd.py); only its frozen ``pos_embed`` parameter is a
    rebuilt, non-persistent buffer here.

    Args:
        in_channels: width of the visual features (filled in by the composed model).
        out_channels: LLM hidden size (filled in by the composed model).
        num_queries: tokens per slice; a square number. Defaults to 64.
        embed_dim: attention width. Defaults to ``out_channels``.
        num_heads: attention heads. Defaults to in_channels // 128 (at least 1): the
            release's ``1024 // 128`` for CLIP ViT-L's 1024-wide features.
        eps: LayerNorm epsilon. Defaults to the release's 1e-6.
    """

    def __init__(self, in_channels: int, out_channels: int, num_queries: int = 64,
                 embed_dim: Optional[int] = None, num_heads: Optional[int] = None,
                 eps: float = 1e-6):
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(f'num_queries must be a square number, got {num_queries}')
        embed_dim = embed_dim or out_channels
        self.num_queries, self.query_grid = num_queries, side
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.register_buffer('pos_embed', sincos_2d(embed_dim, side, side), persistent=False)
        self.kv_proj = (nn.Linear(in_channels, embed_dim, bias=False)
                        if in_channels != embed_dim else nn.Identity())
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads or max(in_channels // 128, 1),
                                          batch_first=True)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(torch.randn(embed_dim, out_channels) * embed_dim ** -0.5)

    def key_pos_embed(self, grid_size) -> torch.Tensor:
        """The query-grid embedding resized to the slice's (h, w) feature grid, (h*w, C)."""
        h, w = grid_size
        if (h, w) == (self.query_grid,) * 2:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, self.query_grid, self.query_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)  # (1, C, h, w)
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, x: torch.Tensor, grid_size=None) -> torch.Tensor:
        """(B, h*w, C_in) -> (B, num_queries, C_out); ``grid_size`` = (h, w), default square."""
        B, N, _ = x.shape
        if grid_size is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f'{N} features are not a square grid: pass grid_size=(h, w)')
            grid_size = (side, side)
        if grid_size[0] * grid_size[1] != N:
            raise ValueError(f'grid_size {tuple(grid_size)} does not match {N} features')
        kv = self.ln_kv(self.kv_proj(x))                              # (B, N, C)
        q = self.ln_q(self.query) + self.pos_embed.to(x.dtype)        # (Q, C)
        keys = kv + self.key_pos_embed(grid_size).to(x.dtype)         # (B, N, C)
        out, _ = self.attn(q.unsqueeze(0).expand(B, -1, -1), keys, kv, need_weights=False)
        return self.ln_post(out) @ self.proj                          # (B, Q, C_out)
