"""Image preprocessing: pad to square with the mean colour, resize, normalise."""
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mllm.registry import TRANSFORMS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand_to_square(image: Image.Image, fill: Tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically (LLaVA-1.5's ``expand2square``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_normalized_tensor(image: Image.Image, mean: Sequence[float],
                         std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor normalised with ``mean``/``std``."""
    if image.mode != 'RGB':
        image = image.convert('RGB')
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    mean, std = torch.as_tensor(mean).view(3, 1, 1), torch.as_tensor(std).view(3, 1, 1)
    return (pixels.permute(2, 0, 1) - mean) / std  # (3, H, W)


@TRANSFORMS.register_module()
class LLaVAImageProcessor:
    """PIL image -> normalised (3, size, size) tensor, as LLaVA-1.5 preprocesses.

    Args:
        size: square output side in pixels. Defaults to 336.
        token_stride: pixels per visual token along a side (the ViT patch size), used to
            tell the text how many image tokens to reserve. Defaults to 14.
        mean, std: normalisation; the mean is also the pad colour. Defaults to CLIP's.
        pad_to_square: pad instead of stretching non-square images. Defaults to True.
        keep_aspect: resize the long side to ``size`` and keep the aspect ratio, both
            sides rounded to multiples of ``token_stride`` (no padding, so no tokens are
            spent on padding; ``pad_to_square`` is ignored). Defaults to False.
    """

    def __init__(self, size: int = 336, token_stride: int = 14,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 pad_to_square: bool = True, keep_aspect: bool = False):
        if size % token_stride:
            raise ValueError(f'image size {size} is not a multiple of token_stride {token_stride}')
        self.size = size
        self.token_stride = token_stride
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.pad_colour = tuple(int(round(m * 255)) for m in mean)
        self.pad_to_square = pad_to_square
        self.keep_aspect = keep_aspect

    def output_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(W, H) of the tensor produced for an image of ``image_size`` = (W, H)."""
        if not self.keep_aspect:
            return (self.size, self.size)
        w, h = image_size
        scale = self.size / max(w, h)
        stride = self.token_stride
        # the long side becomes `size` exactly; the short side the nearest stride multiple
        return tuple(max(stride, round(side * scale / stride) * stride) for side in (w, h))

    def num_visual_tokens(self, image_size: Tuple[int, int]) -> int:
        w, h = self.output_size(image_size)
        return (w // self.token_stride) * (h // self.token_stride)

    def map_boxes(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """xyxy boxes (n, 4) in pixels of the original image of ``image_size`` = (W, H) ->
        pixels of the output tensor, through the same padding and resizing as the image."""
        w, h = image_size
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.pad_to_square and not self.keep_aspect:
            side = max(w, h)  # expand_to_square pastes the image at ((side-w)//2, (side-h)//2)
            offset = torch.tensor([(side - w) // 2, (side - h) // 2] * 2, dtype=torch.float32)
            boxes, w, h = boxes + offset, side, side
        out_w, out_h = self.output_size((w, h))
        return boxes * torch.tensor([out_w / w, out_h / h] * 2)

    def blank(self) -> Image.Image:
        """An image that carries no information: the pad colour everywhere."""
        return Image.new('RGB', (self.size, self.size), self.pad_colour)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != 'RGB':  # convert() copies even when there is nothing to convert
            image = image.convert('RGB')
        if self.pad_to_square and not self.keep_aspect:
            image = expand_to_square(image, self.pad_colour)
        image = image.resize(self.output_size(image.size), Image.BICUBIC)
        return to_normalized_tensor(image, self.mean, self.std)
