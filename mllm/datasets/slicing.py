"""LLaVA-UHD's native-resolution slicing (seed 003, REFERENCE.md "LLaVA-UHD").

An image of W x H pixels is cut into ``rows x cols`` slices of about ``base``² pixels
each, keeping their aspect ratio (no padding, no distortion beyond rounding to the patch
size), plus one low-resolution overview of the whole image. Each slice and the overview
become a fixed number of tokens through the shared resampler, and the text marks the
layout: ``,`` between slices of a row, ``\\n`` after each row, then the overview.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from mllm.datasets.image_processing import CLIP_MEAN, CLIP_STD, to_normalized_tensor, to_rgb
from mllm.registry import TRANSFORMS


def slice_grid(width: int, height: int, base: int = 336, max_slices: int = 6) -> Tuple[int, int]:
    """(rows, cols) for an image; (1, 1) means no slicing (the overview alone).

    N = min(ceil(W·H / base²), max_slices). The candidates are grids of m rows x n cols with
    m·n in {N-1, N, N+1}, excluding 1 and anything above ``max_slices``. Each is scored with
    S = -|log((W/n) / (H/m)) - log(1)|, so the slices come closest to the square
    pre-training shape. Ties go to fewer slices, then to fewer rows.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {width}x{height}')
    num_slices = min(math.ceil(width * height / base ** 2), max_slices)
    if num_slices <= 1:
        return (1, 1)
    best, best_score = None, -math.inf
    for count in (num_slices - 1, num_slices, num_slices + 1):
        if count == 1 or count > max_slices:
            continue
        for rows in range(1, count + 1):
            if count % rows:
                continue
            cols = count // rows
            score = -abs(math.log((width / cols) / (height / rows)))
            if score > best_score + 1e-12:
                best, best_score = (rows, cols), score
    return best


def _round_to(length: float, multiple: int) -> int:
    return max(round(length / multiple) * multiple, multiple)


def best_resize(width: float, height: float, base: int = 336, patch: int = 14,
                allow_upscale: bool = False) -> Tuple[int, int]:
    """About ``base``² pixels with the same aspect ratio, sides multiples of ``patch``.

    Images already smaller than ``base``² keep their size unless ``allow_upscale``.
    """
    if width * height > base * base or allow_upscale:
        ratio = width / height
        height = int(base / math.sqrt(ratio))
        width = int(height * ratio)
    return _round_to(width, patch), _round_to(height, patch)


def slice_layout(width: int, height: int, base: int = 336, patch: int = 14,
                 max_slices: int = 6) -> dict:
    """Everything that depends only on the image size.

    Returns dict(grid=(rows, cols), slice_size=(w, h) or None, overview_size=(w, h)).
    """
    rows, cols = slice_grid(width, height, base, max_slices)
    if (rows, cols) == (1, 1):
        return dict(grid=(1, 1), slice_size=None,
                    overview_size=best_resize(width, height, base, patch))
    # equal slices: the whole image is resized to cols x rows slices of the best size
    cell_w = _round_to(width, cols) / cols
    cell_h = _round_to(height, rows) / rows
    return dict(grid=(rows, cols),
                slice_size=best_resize(cell_w, cell_h, base, patch, allow_upscale=True),
                overview_size=best_resize(width, height, base, patch, allow_upscale=True))


@TRANSFORMS.register_module()
class UHDImageProcessor:
    """PIL image -> [slice_1, ..., slice_k, overview] normalised tensors, plus the text
    layout that replaces ``<image>``.

    Args:
        base: the ViT's pre-training resolution (336 for CLIP ViT-L/14-336).
        patch: the ViT patch size; slice sides are multiples of it.
        max_slices: the slice cap (6 in the paper, for inputs up to 672x1008).
        tokens_per_unit: tokens the resampler makes of each slice and the overview;
            configs leave it to be bound from ``model.projector.num_queries``.
        mean, std: normalisation. Defaults to CLIP's.
    """

    def __init__(self, base: int = 336, patch: int = 14, max_slices: int = 6,
                 tokens_per_unit: Optional[int] = 64, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        self.base, self.patch, self.max_slices = base, patch, max_slices
        self.size = base  # the default image size `mllm inspect` reports for
        self.tokens_per_unit = tokens_per_unit
        self.mean, self.std = tuple(mean), tuple(std)

    def layout(self, image_size: Tuple[int, int]) -> dict:
        return slice_layout(*image_size, base=self.base, patch=self.patch,
                            max_slices=self.max_slices)

    def unit_sizes(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """(W, H) of every tensor made for one image: the slices, then the overview."""
        layout = self.layout(image_size)
        rows, cols = layout['grid']
        slices = [] if layout['slice_size'] is None else [layout['slice_size']] * (rows * cols)
        return slices + [layout['overview_size']]

    def num_visual_tokens(self, image_size: Tuple[int, int]) -> List[int]:
        """Tokens per unit (slices, then the overview)."""
        return [self.tokens_per_unit] * len(self.unit_sizes(image_size))

    def placeholder(self, image_size: Tuple[int, int], image_token: str = '<image>') -> str:
        """The text that stands for the image: ``,`` between the slices of a row, ``\\n``
        after each row, then the overview."""
        rows, cols = self.layout(image_size)['grid']
        if (rows, cols) == (1, 1):
            return image_token
        grid = '\n'.join(','.join([image_token] * cols) for _ in range(rows))
        return grid + '\n' + image_token

    def blank(self) -> Image.Image:
        return Image.new('RGB', (self.base, self.base),
                         tuple(int(round(m * 255)) for m in self.mean))

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        image = to_rgb(image)
        layout = self.layout(image.size)
        units = []
        if layout['slice_size'] is not None:
            rows, cols = layout['grid']
            sw, sh = layout['slice_size']
            resized = image.resize((sw * cols, sh * rows), Image.BICUBIC)
            for r in range(rows):
                for c in range(cols):
                    crop = resized.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))
                    units.append(to_normalized_tensor(crop, self.mean, self.std))
        overview = image.resize(layout['overview_size'], Image.BICUBIC)
        units.append(to_normalized_tensor(overview, self.mean, self.std))
        return units
