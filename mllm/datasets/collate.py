"""Batching: pad token sequences, stack images in sample order."""
from typing import Dict, List

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
