"""LLaVA-UHD's native-resolution slicing (seed 003, REFERENCE.md "LLaVA-UHD").

An image of W x H pixels is cut into ``rows x cols`` slices of about ``base``² pixels
each, keeping their aspect ratio (no padding, no distortion beyond the patch multiple),
plus one low-resolution overview of the whole image. Each slice and the overview become a
fixed number of tokens through the shared resampler, and the layout is marked between
them: ``,`` after each slice but the last of a row, ``\\n`` after the last, then the overview.

Two variants (``variant=``):

* ``'release'`` (default): byte for byte the released ``slice_image_minicpm``
  (thunlp/LLaVA-UHD, branch LLaVA-UHD-v1, ``llava/slice_process.py``, as called by its
  ``train.py`` with ``max_slice_nums=7, scale_resolution=336, patch_size=14``): sides are
  floored to the patch multiple, an unsliced image is resized (up or down) to about
  ``base``², ties between grids go to the first candidate in (fewer slices, fewer columns)
  order, and the cap is 7 slices.
* ``'paper'``: this project's earlier reading of the paper / seed 003: sides rounded to the
  patch multiple, an unsliced image is only ever downscaled, ties go to fewer rows, cap 6.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from mllm.datasets.image_processing import CLIP_MEAN, CLIP_STD, to_normalized_tensor, to_rgb
from mllm.registry import TRANSFORMS

VARIANTS = ('release', 'paper')
DEFAULT_MAX_SLICES = dict(release=7, paper=6)  # the release's train.py passes max_slice_nums=7


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f'unknown UHD slicing variant {variant!r}, expected one of {VARIANTS}')


def slice_grid(width: int, height: int, base: int = 336, max_slices: Optional[int] = None,
               variant: str = 'release') -> Tuple[int, int]:
    """(rows, cols) for an image; (1, 1) means no slicing (the overview alone).

    N = min(ceil(W·H / base²), max_slices). The candidates are grids with {N-1, N, N+1}
    slices, excluding 1 and anything above ``max_slices``. The error |log(W/H) - log(cols/rows)|
    (the slices' aspect ratio's distance from square) picks the grid. On a tie the release
    keeps the first candidate, in order of slice count then column count (a 400x400 image:
    2 rows x 1 col); ``'paper'`` prefers fewer rows (1 row x 2 cols).
    """
    _check_variant(variant)
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {width}x{height}')
    max_slices = DEFAULT_MAX_SLICES[variant] if max_slices is None else max_slices
    num_slices = min(math.ceil(width * height / base ** 2), max_slices)
    if num_slices <= 1:
        return (1, 1)
    log_ratio = math.log(width / height)
    best, min_error = (1, 1), math.inf
    for count in (num_slices - 1, num_slices, num_slices + 1):
        if count == 1 or count > max_slices:
            continue
        for first in range(1, count + 1):  # release: columns; paper: rows
            if count % first:
                continue
            rows, cols = (count // first, first) if variant == 'release' else (first, count // first)
            error = abs(log_ratio - math.log(cols / rows))
            # the release compares with a strict <; the paper variant with a 1e-12 margin
            if error < min_error - (1e-12 if variant == 'paper' else 0):
                best, min_error = (rows, cols), error
    return best


def _to_multiple(length: float, multiple: int, variant: str = 'release') -> int:
    """The release's ``ensure_divide``: floor (``'paper'``: round) to a multiple, at least one."""
    steps = math.floor(length / multiple) if variant == 'release' else round(length / multiple)
    return max(steps * multiple, multiple)


def best_resize(width: float, height: float, base: int = 336, patch: int = 14,
                allow_upscale: bool = False, variant: str = 'release') -> Tuple[int, int]:
    """The release's ``find_best_resize``: about ``base``² pixels with the same aspect ratio
    (``int`` truncation as there), sides multiples of ``patch``. Images already smaller than
    ``base``² keep their size unless ``allow_upscale``."""
    _check_variant(variant)
    if width * height > base * base or allow_upscale:
        ratio = width / height
        height = int(base / math.sqrt(ratio))
        width = int(height * ratio)
    return _to_multiple(width, patch, variant), _to_multiple(height, patch, variant)


def slice_layout(width: int, height: int, base: int = 336, patch: int = 14,
                 max_slices: Optional[int] = None, variant: str = 'release') -> dict:
    """Everything that depends only on the image size.

    Returns dict(grid=(rows, cols), slice_size=(w, h) or None, overview_size=(w, h)).
    """
    rows, cols = slice_grid(width, height, base, max_slices, variant)
    if (rows, cols) == (1, 1):
        # the release upsamples an unsliced image to about base² ("dont need to slice, upsample")
        return dict(grid=(1, 1), slice_size=None,
                    overview_size=best_resize(width, height, base, patch,
                                              allow_upscale=variant == 'release', variant=variant))
    # equal slices: the whole image is resized to cols x rows slices of the best size
    # (the release's get_refine_size)
    cell_w = _to_multiple(width, cols, variant) / cols
    cell_h = _to_multiple(height, rows, variant) / rows
    # the release does not upscale the overview of a sliced image (it is above base² anyway)
    return dict(grid=(rows, cols),
                slice_size=best_resize(cell_w, cell_h, base, patch, allow_upscale=True,
                                       variant=variant),
                overview_size=best_resize(width, height, base, patch,
                                          allow_upscale=variant == 'paper', variant=variant))


def _byte_level_char(byte: int) -> str:
    """GPT-2's ``bytes_to_unicode``: the character byte-level BPE vocabularies (Llama-3,
    Qwen) spell a byte with, e.g. ``\\n`` -> ``Ċ``."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sum(1 for b in range(byte) if b not in printable))


def resolve_token_id(tokenizer, token) -> int:
    """The single vocabulary id of ``token``: an int is taken as the id; a string is looked
    up as one vocabulary entry, never tokenised in context (SentencePiece would make ``,``
    into ``▁,``). A one-byte string also matches its SentencePiece byte-fallback entry
    (``\\n`` -> ``<0x0A>``, id 13 in Llama-2) or its byte-level BPE spelling (``Ċ``)."""
    size = len(tokenizer)
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < size:
            raise ValueError(f'separator id {token} is outside the vocabulary of {size} ids')
        return token
    if not isinstance(token, str) or not token:
        raise ValueError(f'a separator is a token string or an id, got {token!r}')
    vocab = tokenizer.get_vocab()
    spellings = [token, ''.join(_byte_level_char(b) for b in token.encode())]
    if len(token.encode()) == 1:
        spellings.insert(1, f'<0x{token.encode()[0]:02X}>')
    for spelling in spellings:
        if spelling in vocab:
            return vocab[spelling]
    raise ValueError(f'separator {token!r} is not a single token of this tokenizer '
                     f'({type(tokenizer).__name__}, tried {spellings}); set the image '
                     "processor's separators to tokens of its vocabulary or to ids")


class SliceLayout(int):
    """The positions one sliced image takes in the LLM input, as the release lays them out
    (``llava_arch.py``): each slice's tokens followed by one separator id, ``,`` after a
    slice that is not the last of its row and ``\\n`` after the last, then the overview's
    tokens. The int value is the number of positions (image tokens + separators), so length
    arithmetic keeps working; the chat templates expand it with ``token_ids(tokenizer)``
    into image sentinels and the separators' ids, embedded as ids, never tokenised in
    context."""

    def __new__(cls, rows: int, cols: int, tokens_per_unit: int, separators: Sequence):
        value = super().__new__(cls, (rows * cols + 1) * tokens_per_unit + rows * cols)
        value.rows, value.cols, value.tokens_per_unit = rows, cols, tokens_per_unit
        value.separators = tuple(separators)
        return value

    def __getnewargs__(self):
        return self.rows, self.cols, self.tokens_per_unit, self.separators

    def token_ids(self, tokenizer) -> List[int]:
        from mllm.datasets.templates import IMAGE_TOKEN_INDEX

        comma, newline = (resolve_token_id(tokenizer, t) for t in self.separators)
        image = [IMAGE_TOKEN_INDEX] * self.tokens_per_unit
        ids = []
        for _ in range(self.rows):
            for c in range(self.cols):
                ids += image + [newline if c == self.cols - 1 else comma]
        return ids + image  # the overview


@TRANSFORMS.register_module()
class UHDImageProcessor:
    """PIL image -> [slice_1, ..., slice_k, overview] normalised tensors, plus the layout of
    their tokens: the text keeps one ``<image>``, which takes ``num_visual_tokens(size)``
    positions (a ``SliceLayout`` for a sliced image: slices, separators, overview).

    Args:
        base: the ViT's pre-training resolution (336 for CLIP ViT-L/14-336).
        patch: the ViT patch size; slice sides are multiples of it.
        max_slices: the slice cap. Defaults to the variant's: 7 for ``'release'`` (its
            ``max_slice_nums=7``), 6 for ``'paper'`` (inputs up to 672x1008).
        tokens_per_unit: tokens the resampler makes of each slice and the overview;
            configs leave it to be bound from ``model.projector.num_queries``.
        mean, std: normalisation. Defaults to CLIP's.
        variant: ``'release'`` (default, the released ``slice_image_minicpm``) or
            ``'paper'`` (see the module docstring).
        separators: the (between slices of a row, end of a row) separators: vocabulary
            token strings, each resolved to its single id (``resolve_token_id``), or ids.
            Defaults to the release's ``(',', '\\n')``, which are its ids 29892 and 13 in
            the Llama-2 / Vicuna vocabulary.
    """

    def __init__(self, base: int = 336, patch: int = 14, max_slices: Optional[int] = None,
                 tokens_per_unit: Optional[int] = 64, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, variant: str = 'release',
                 separators: Sequence = (',', '\n')):
        _check_variant(variant)
        if len(separators) != 2:
            raise ValueError(f'separators is (between slices, end of row), got {separators!r}')
        self.variant = variant
        self.max_slices = DEFAULT_MAX_SLICES[variant] if max_slices is None else max_slices
        self.base, self.patch = base, patch
        self.size = base  # the default image size `mllm inspect` reports for
        self.tokens_per_unit = tokens_per_unit
        self.mean, self.std = tuple(mean), tuple(std)
        self.separators = tuple(separators)

    def layout(self, image_size: Tuple[int, int]) -> dict:
        return slice_layout(*image_size, base=self.base, patch=self.patch,
                            max_slices=self.max_slices, variant=self.variant)

    def unit_sizes(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """(W, H) of every tensor made for one image: the slices, then the overview."""
        layout = self.layout(image_size)
        rows, cols = layout['grid']
        slices = [] if layout['slice_size'] is None else [layout['slice_size']] * (rows * cols)
        return slices + [layout['overview_size']]

    def num_visual_tokens(self, image_size: Tuple[int, int]) -> List[int]:
        """Positions of the image's one ``<image>``: ``[tokens_per_unit]`` for an unsliced
        image, else ``[SliceLayout]`` (slices, separators, overview)."""
        rows, cols = self.layout(image_size)['grid']
        if (rows, cols) == (1, 1):
            return [self.tokens_per_unit]
        return [SliceLayout(rows, cols, self.tokens_per_unit, self.separators)]

    def placeholder(self, image_size: Tuple[int, int], image_token: str = '<image>') -> str:
        """The text that stands for the image: ``<image>`` itself, as in the release, whose
        prompt holds one image token; the slice layout is in ``num_visual_tokens``."""
        return image_token

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
