"""Image reading (``open_rgb``: every image mllm trains, evaluates or chats on) and
preprocessing: pad to square with the mean colour, resize, normalise."""
from typing import BinaryIO, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mllm.registry import TRANSFORMS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's own default limit (about 9459 x 9459); a larger image is refused before it is decoded
MAX_IMAGE_PIXELS = 89_478_485
# 16-bit greyscale modes (PNG, TIFF); PIL's convert() clips them at 255, i.e. nearly all white
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


class ImageError(ValueError):
    """An image that cannot be read or used; the message names it."""


def to_rgb(image: Image.Image, name: str = 'image') -> Image.Image:
    """An 8-bit RGB copy of ``image``. 16-bit greyscale is scaled by the range of its format
    (0..65535 -> 0..255, not by the image's own min/max, so intensities mean the same in
    every image); 32-bit integer ('I') and float ('F') pixels have no range the format
    defines and are refused with an ``ImageError`` naming ``name``, except 'I' images from
    PGM/PPM files, which PIL always decodes to 0..65535."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == 'I' and image.format == 'PPM'):
        pixels = np.asarray(image).astype(np.uint32)
        grey = (pixels * 255 + 32767) // 65535  # rounded, exact for multiples of 257
        return Image.fromarray(grey.astype(np.uint8), 'L').convert('RGB')
    if mode in ('I', 'F'):
        kind = 'integer' if mode == 'I' else 'float'
        raise ImageError(f'image {name} has 32-bit {kind} pixels (mode {mode!r}) with no value '
                         'range to scale to 8 bits; save it as an 8- or 16-bit PNG')
    return image.convert('RGB')


def open_rgb(source: Union[str, BinaryIO], name: Optional[str] = None,
             max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image file ``source`` (a path or a binary file) as 8-bit RGB (``to_rgb``).

    Its size is read from the header and an image of more than ``max_pixels`` pixels
    (a decompression bomb) is refused before it is decoded, as is one over PIL's own limit
    (``PIL.Image.MAX_IMAGE_PIXELS``). Raises ``FileNotFoundError``, or ``ImageError`` naming
    ``name`` (default: the path) for an image that cannot be decoded or is refused.
    """
    name = source if name is None else name
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f'image {name} is {width}x{height} = {width * height} pixels, '
                                 f'more than max_image_pixels={max_pixels} (a decompression bomb?)')
            return to_rgb(image, name)
    except (FileNotFoundError, ImageError):
        raise
    # ValueError: e.g. PIL's 'Decompressed Data Too Large' for a bomb in a PNG text chunk
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f'cannot decode image {name} ({err})') from err


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
        image = to_rgb(image)
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
        # truncated, not rounded: LLaVA's expand2square (train.py) and transformers'
        # LlavaImageProcessor both pad with int(m * 255)
        self.pad_colour = tuple(int(m * 255) for m in mean)
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
            image = to_rgb(image)
        if self.pad_to_square and not self.keep_aspect:
            image = expand_to_square(image, self.pad_colour)
        image = image.resize(self.output_size(image.size), Image.BICUBIC)
        return to_normalized_tensor(image, self.mean, self.std)
