"""Batching: pad token sequences, stack images in sample order."""
from typing import Dict, List, Optional

import torch

from mllm.datasets.templates import IGNORE_INDEX
from mllm.registry import FUNCTIONS


@FUNCTIONS.register_module()
def llava_collate(instances: List[dict], pad_token_id: int = 0,
                  padding_side: str = 'right') -> Dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` and build the attention mask.

    Padded positions get ``attention_mask`` 0 and label ``IGNORE_INDEX``, so they are
    neither attended to nor learned. Images keep sample order, which is the order the
    model scatters their features into the image-token slots: one (B_img, 3, H, W) tensor
    when all have one shape, else a list of (3, H_i, W_i) tensors. Use
    ``padding_side='left'`` for batched generation.
    """
    if padding_side not in ('left', 'right'):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(len(x['input_ids']) for x in instances)
    input_ids = torch.full((len(instances), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(instances), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(instances), longest), dtype=torch.long)
    for row, x in enumerate(instances):
        n = len(x['input_ids'])
        cols = slice(longest - n, longest) if padding_side == 'left' else slice(0, n)
        input_ids[row, cols] = torch.as_tensor(x['input_ids'])
        attention_mask[row, cols] = 1
        if 'labels' in x:
            labels[row, cols] = torch.as_tensor(x['labels'])
    # a sample holds one image tensor or a list of them (slices); flatten in sample order
    images = []
    for x in instances:
        pixels = x.get('pixel_values')
        if pixels is not None:
            images += list(pixels) if isinstance(pixels, (list, tuple)) else [pixels]
    if images and len({tuple(im.shape) for im in images}) == 1:
        images = torch.stack(images)  # one shape: a plain batch tensor
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                 pixel_values=images if len(images) else None)
    if any(x.get('boxes') is not None for x in instances):
        # object boxes, one (n_i, 4) tensor per image in image order (MG-LLaVA)
        batch['boxes'] = [torch.as_tensor(x['boxes']).reshape(-1, 4) if x.get('boxes') is not None
                          else torch.zeros(0, 4)
                          for x in instances if x.get('pixel_values') is not None]
    return batch


def pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """Sample indices per row: first-fit decreasing into rows of ``capacity`` tokens.

    Rows keep their samples in ascending index order, and rows are ordered by their first
    sample, so the layout depends only on the lengths (deterministic across processes).
    """
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f'sample {i} has {lengths[i]} tokens, more than the pack length '
                             f'{capacity}')
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return sorted(sorted(r) for r in rows)


@FUNCTIONS.register_module()
def packed_llava_collate(instances: List[dict], pad_token_id: int = 0,
                         pack_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Several samples per row, each attending only to itself: less padding, same loss.

    Rows are filled first-fit decreasing up to ``pack_length`` tokens (default: the longest
    sample of the batch, so no row is longer than plain padding would make it). Instead of
    an ``attention_mask`` the batch carries ``position_ids`` that restart at 0 for every
    sample; ``LLaVAModel`` turns them into a block-diagonal causal mask (or hands them to
    flash-attention's varlen path). A sample's first label is ``IGNORE_INDEX`` (BOS /
    prompt), so no loss crosses a sample boundary; padding is a segment of its own at the
    row end. Images follow the packed token order, as the model scatters them.
    ``sample_rows`` lists the dataset indices per row (``index`` of each instance).
    Use it from a config as ``collate_fn=dict(type='mllm.packed_llava_collate')``.
    """
    lengths = [len(x['input_ids']) for x in instances]
    capacity = max(lengths) if pack_length is None else pack_length
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    images, boxes = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            x, n = instances[i], lengths[i]
            input_ids[r, start:start + n] = torch.as_tensor(x['input_ids'])
            if 'labels' in x:
                labels[r, start:start + n] = torch.as_tensor(x['labels'])
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
            pixels = x.get('pixel_values')
            if pixels is not None:
                images += list(pixels) if isinstance(pixels, (list, tuple)) else [pixels]
                box = x.get('boxes')
                boxes.append(torch.zeros(0, 4) if box is None
                             else torch.as_tensor(box).reshape(-1, 4))
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own segment
    if images and len({tuple(im.shape) for im in images}) == 1:
        images = torch.stack(images)
    batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids,
                 pixel_values=images if len(images) else None,
                 sample_rows=[[instances[i].get('index', i) for i in row] for row in rows],
                 num_tokens=sum(lengths))  # real tokens, for ThroughputHook (no mask here)
    if any(x.get('boxes') is not None for x in instances):
        batch['boxes'] = boxes  # MG-LLaVA: one (n_i, 4) tensor per image, packed order
    return batch


@FUNCTIONS.register_module()
def flat_llava_collate(instances: List[dict], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Padding-free batch: every sample of the batch, in order, concatenated in ONE row.

    ``packed_llava_collate`` with room for all samples, so no position is padding: the
    projector, norms, MLPs and LM head run on exactly the real tokens. Position ids restart
    per sample; ``LLaVAModel`` runs attention per sample segment (no mask, no causal upper
    triangle) where the LLM supports it, else falls back to a block-diagonal mask over the
    row (quadratic in the batch's tokens: prefer ``packed_llava_collate`` there).
    Use it from a config as ``collate_fn=dict(type='mllm.flat_llava_collate')``.
    """
    total = sum(len(x['input_ids']) for x in instances)
    return packed_llava_collate(instances, pad_token_id=pad_token_id, pack_length=total)
