"""LLaVA-UHD (CLIP ViT on native-resolution slices + an overview, a perceiver resampler, a
causal LLM) for plain transformers, written next to the weights by
``mllm convert pth-to-hf ... --format remote_code`` with ``modeling_mllm_common.py``:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=image, text=processor.apply_chat_template(messages,
                       add_generation_prompt=True), return_tensors='pt')
    model.generate(**inputs, max_new_tokens=32)

Self-contained: it needs torch, transformers and PIL; never mllm. The slicing is mllm's
``UHDImageProcessor`` (the released ``slice_image_minicpm``, or the 'paper' variant): an image
becomes ``rows x cols`` slices of about ``base``² pixels plus an overview; each becomes
``tokens_per_unit`` tokens through the resampler, and its ``<image>`` becomes, in ids,
``[slice tokens][',' id]...[slice tokens]['\\n' id]...[overview tokens]``: the separators
are embedded as ids, never tokenised in context. ``pixel_values`` holds every unit (slice or
overview) of every image, in order, zero-padded to the largest; ``image_sizes`` their own
(H, W). Parameter names are mllm's (``vision_encoder.model.*``, ``projector.query``,
``projector.attn``, ``llm.*``), so the weights are mllm's state dict as it is.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BatchFeature, PretrainedConfig
from transformers.processing_utils import ProcessorMixin

from .modeling_mllm_common import CLIPTower, MllmForCausalLMBase

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------ slicing (mllm's slicing.py)

def slice_grid(width: int, height: int, base: int, max_slices: int,
               variant: str = 'release') -> Tuple[int, int]:
    """(rows, cols) for an image; (1, 1) means no slicing (the overview alone). The grid
    with N - 1, N or N + 1 slices (N = min(ceil(W·H / base²), max_slices)) whose cell
    aspect is nearest the image's; ties: the release keeps the first candidate (fewer slices,
    then fewer columns), 'paper' prefers fewer rows."""
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
            rows, cols = ((count // first, first) if variant == 'release'
                          else (first, count // first))
            error = abs(log_ratio - math.log(cols / rows))
            if error < min_error - (1e-12 if variant == 'paper' else 0):
                best, min_error = (rows, cols), error
    return best


def _to_multiple(length: float, multiple: int, variant: str = 'release') -> int:
    """Floor ('paper': round) to a multiple, at least one."""
    steps = math.floor(length / multiple) if variant == 'release' else round(length / multiple)
    return max(steps * multiple, multiple)


def best_resize(width: float, height: float, base: int, patch: int, allow_upscale: bool = False,
                variant: str = 'release') -> Tuple[int, int]:
    """About ``base``² pixels with the same aspect ratio, sides multiples of ``patch``;
    images already smaller keep their size unless ``allow_upscale``."""
    if width * height > base * base or allow_upscale:
        ratio = width / height
        height = int(base / math.sqrt(ratio))
        width = int(height * ratio)
    return _to_multiple(width, patch, variant), _to_multiple(height, patch, variant)


def slice_layout(width: int, height: int, base: int, patch: int, max_slices: int,
                 variant: str = 'release') -> dict:
    """dict(grid=(rows, cols), slice_size=(w, h) or None, overview_size=(w, h))."""
    rows, cols = slice_grid(width, height, base, max_slices, variant)
    if (rows, cols) == (1, 1):
        return dict(grid=(1, 1), slice_size=None,
                    overview_size=best_resize(width, height, base, patch,
                                              allow_upscale=variant == 'release', variant=variant))
    cell_w = _to_multiple(width, cols, variant) / cols
    cell_h = _to_multiple(height, rows, variant) / rows
    return dict(grid=(rows, cols),
                slice_size=best_resize(cell_w, cell_h, base, patch, allow_upscale=True,
                                       variant=variant),
                overview_size=best_resize(width, height, base, patch,
                                          allow_upscale=variant == 'paper', variant=variant))


def _normalized(image: Image.Image, mean, std) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ``(x / 255 - mean) / std``."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    mean, std = torch.as_tensor(mean).view(3, 1, 1), torch.as_tensor(std).view(3, 1, 1)
    return (pixels.permute(2, 0, 1) - mean) / std


class MllmUhdProcessor(ProcessorMixin):
    """The tokenizer plus LLaVA-UHD's slicing, as mllm's ``UHDImageProcessor`` and prompt
    builder: ``processor(images=, text=)`` gives ``input_ids`` with each ``<image>``
    expanded to its slice layout, ``attention_mask``, ``pixel_values`` (units, 3, H, W) and
    ``image_sizes`` (units, 2).

    Args:
        tokenizer: the LLM's tokenizer, with ``image_token`` in its vocabulary.
        chat_template: the training template as Jinja (one ``<image>`` per image).
        base, patch, max_slices, variant: the slicing (mllm's ``UHDImageProcessor``).
        tokens_per_unit: the resampler's tokens per slice or overview.
        image_mean, image_std: normalisation.
        separator_ids: the ids after a slice that is not / is the last of its row.
        image_token: the text of an image placeholder.
    """

    def __init__(self, tokenizer=None, chat_template=None, base: int = 336, patch: int = 14,
                 max_slices: int = 7, tokens_per_unit: int = 64,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 variant: str = 'release', separator_ids: Sequence[int] = (),
                 image_token: str = '<image>'):
        if variant not in ('release', 'paper'):
            raise ValueError(f"variant is 'release' or 'paper', got {variant!r}")
        if len(separator_ids) != 2:
            raise ValueError('separator_ids is (between slices, end of row), got '
                             f'{separator_ids!r}')
        self.base, self.patch, self.max_slices = base, patch, max_slices
        self.tokens_per_unit, self.variant = tokens_per_unit, variant
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.separator_ids, self.image_token = [int(i) for i in separator_ids], image_token
        super().__init__(tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def layout(self, image_size: Tuple[int, int]) -> dict:
        return slice_layout(*image_size, base=self.base, patch=self.patch,
                            max_slices=self.max_slices, variant=self.variant)

    def image_units(self, image: Image.Image) -> List[torch.Tensor]:
        """The slices (row-major), then the overview, normalised (3, h, w) tensors."""
        layout = self.layout(image.size)
        units = []
        if layout['slice_size'] is not None:
            rows, cols = layout['grid']
            sw, sh = layout['slice_size']
            resized = image.resize((sw * cols, sh * rows), Image.BICUBIC)
            for r in range(rows):
                for c in range(cols):
                    crop = resized.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))
                    units.append(_normalized(crop, self.image_mean, self.image_std))
        overview = image.resize(layout['overview_size'], Image.BICUBIC)
        units.append(_normalized(overview, self.image_mean, self.image_std))
        return units

    def image_ids(self, image_size: Tuple[int, int]) -> List[int]:
        """The ids one ``<image>`` becomes: per slice its image tokens and a separator, then
        the overview's image tokens."""
        rows, cols = self.layout(image_size)['grid']
        image = [self.image_token_id] * self.tokens_per_unit
        if (rows, cols) == (1, 1):
            return image
        comma, newline = self.separator_ids
        ids = []
        for _ in range(rows):
            for c in range(cols):
                ids += image + [newline if c == cols - 1 else comma]
        return ids + image

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs) -> BatchFeature:
        """``images``: a PIL image or a list, one per ``<image>`` of ``text`` in order;
        ``text``: a string or a list (a batch, padded on the tokenizer's padding side).
        Other keyword arguments go to the tokenizer."""
        if text is None:
            raise ValueError('text is required (it holds one <image> per image)')
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        images = [Image.fromarray(np.asarray(i)) if not isinstance(i, Image.Image) else i
                  for i in images]
        images = [i if i.mode == 'RGB' else i.convert('RGB') for i in images]
        kwargs.pop('padding', None)
        encoded = self.tokenizer(texts, **kwargs)['input_ids']
        image_id, queue = self.image_token_id, iter(images)
        input_ids = []
        for ids in encoded:
            expanded = []
            for token in ids:
                if token != image_id:
                    expanded.append(token)
                    continue
                image = next(queue, None)
                if image is None:
                    raise ValueError(f'the text has more {self.image_token} than the '
                                     f'{len(images)} images')
                expanded += self.image_ids(image.size)
            input_ids.append(expanded)
        if next(queue, None) is not None:
            raise ValueError(f'{len(images)} images but fewer {self.image_token} in the text')
        data = self._pad(input_ids)
        if images:
            units = [u for image in images for u in self.image_units(image)]
            height = max(u.shape[1] for u in units)
            width = max(u.shape[2] for u in units)
            pixel_values = torch.zeros(len(units), 3, height, width)
            for i, unit in enumerate(units):
                pixel_values[i, :, :unit.shape[1], :unit.shape[2]] = unit
            data['pixel_values'] = pixel_values
            data['image_sizes'] = torch.tensor([list(u.shape[1:]) for u in units])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pad(self, input_ids: List[List[int]]) -> dict:
        """Pad to the longest on the tokenizer's padding side, with its attention mask."""
        longest = max(len(ids) for ids in input_ids)
        pad_id = self.tokenizer.pad_token_id or 0
        left = self.tokenizer.padding_side == 'left'
        data = dict(input_ids=[], attention_mask=[])
        for ids in input_ids:
            pad = longest - len(ids)
            data['input_ids'].append([pad_id] * pad + ids if left else ids + [pad_id] * pad)
            mask = [1] * len(ids)
            data['attention_mask'].append([0] * pad + mask if left else mask + [0] * pad)
        return data

    @property
    def model_input_names(self) -> List[str]:
        return ['input_ids', 'attention_mask', 'pixel_values', 'image_sizes']


# ------------------------------------------------------------------------------- model

class MllmUhdConfig(PretrainedConfig):
    """Args:
        text_config: the LLM's config (a dict with ``model_type``).
        clip_config: ``CLIPVisionConfig`` fields of the ViT.
        select_layer: the CLIP hidden layer used (patch tokens, CLS dropped).
        resampler_config: ``num_queries``, ``embed_dim``, ``num_heads``, ``eps``.
        image_token_index: the id the processor puts once per visual token.
    """
    model_type = 'mllm_uhd'
    sub_configs = {'text_config': AutoConfig}

    def __init__(self, text_config=None, clip_config=None, select_layer: int = -2,
                 resampler_config=None, image_token_index: Optional[int] = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.clip_config = dict(clip_config or {})
        self.select_layer = select_layer
        self.resampler_config = dict(resampler_config or {})
        self.image_token_index = image_token_index
        super().__init__(**kwargs)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding (grid_h * grid_w, embed_dim), float32: the first half of
    the channels encodes the column, the second the row, each half [sin | cos]."""
    def encode(positions, dim):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0))
        angles = positions.float()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([encode(cols, embed_dim // 2), encode(rows, embed_dim // 2)], 1)


class Resampler(nn.Module):
    """LLaVA-UHD's resampler: ``num_queries`` queries (+ the query grid's sin-cos embedding)
    attend once over a unit's features (+ that embedding resized, bicubic, to the unit's
    feature grid)."""

    def __init__(self, in_channels: int, out_channels: int, num_queries: int, embed_dim: int,
                 num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_queries, self.query_grid = num_queries, math.isqrt(num_queries)
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = (nn.Linear(in_channels, embed_dim, bias=False)
                        if in_channels != embed_dim else nn.Identity())
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(embed_dim, out_channels))

    def pos_embed(self, device) -> torch.Tensor:
        # NOTE: built on the CPU per call, not a buffer: a non-persistent buffer would be
        # left on the meta device by from_pretrained's empty-weights init
        return sincos_2d(self.embed_dim, self.query_grid, self.query_grid).to(device)

    def key_pos_embed(self, pos_embed, grid_size) -> torch.Tensor:
        h, w = grid_size
        if (h, w) == (self.query_grid,) * 2:
            return pos_embed
        grid = pos_embed.reshape(1, self.query_grid, self.query_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, x: torch.Tensor, grid_size) -> torch.Tensor:
        """(B, h*w, C_in) -> (B, num_queries, C_out); ``grid_size`` = (h, w)."""
        pos_embed = self.pos_embed(x.device)
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + pos_embed.to(x.dtype)
        keys = kv + self.key_pos_embed(pos_embed, grid_size).to(x.dtype)
        out, _ = self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), keys, kv,
                           need_weights=False)
        return self.ln_post(out) @ self.proj


class MllmUhdForCausalLM(MllmForCausalLMBase):
    config_class = MllmUhdConfig
    base_model_prefix = 'mllm_uhd'

    def __init__(self, config: MllmUhdConfig):
        super().__init__(config)
        self.vision_encoder = CLIPTower(config.clip_config, config.select_layer)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.projector = Resampler(self.vision_encoder.model.config.hidden_size,
                                   config.text_config.hidden_size, **config.resampler_config)
        self.post_init()

    def image_features(self, pixel_values, image_sizes=None) -> torch.Tensor:
        """(U, 3, H, W) units (each cropped to its ``image_sizes`` row) -> (U * Q, C_llm) in
        unit order; units of one size are encoded together, as mllm does."""
        units = list(pixel_values)
        if image_sizes is not None:
            units = [u[:, :h, :w] for u, (h, w) in zip(units, image_sizes.tolist())]
        by_shape = {}
        for i, unit in enumerate(units):
            by_shape.setdefault(tuple(unit.shape), []).append(i)
        feats = [None] * len(units)
        patch = self.vision_encoder.patch_size
        for (_, h, w), indices in by_shape.items():
            tokens = self.vision_encoder(torch.stack([units[i] for i in indices]))
            out = self.projector(tokens, grid_size=(h // patch, w // patch))
            for i, f in zip(indices, out):
                feats[i] = f
        return torch.cat(feats)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, inputs_embeds=None,
                **kwargs):
        return self.forward_llm(input_ids, pixel_values, inputs_embeds,
                                dict(image_sizes=image_sizes), kwargs)
