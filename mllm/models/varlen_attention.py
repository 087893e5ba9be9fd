"""Attention over packed / flattened batches without a dense mask: one causal SDPA call
per sample segment.

A packed batch (``packed_llava_collate``, ``flat_llava_collate``) holds several samples
per row, with position ids restarting at 0 for each. A block-diagonal T x T mask gives
each sample its own causal attention, but it is built and read in full (quadratic in the
row length, the whole batch for a flattened one) and SDPA cannot skip the causal upper
triangle. Here each segment runs ``scaled_dot_product_attention(is_causal=True)`` on its
own slice of q/k/v: attention costs what the samples need, and no mask is built.

The segments travel as the attention mask itself: a 1-D int32 tensor of boundaries
(flash-attention's ``cu_seqlens``, from ``segment_starts``). transformers never makes a
1-D mask, so the SDPA attention function can tell it apart
(``mllm.engine.patches.sdpa_segment_masks``; under transformers 5 with
``pass_segment_masks_v5``), and as the mask it reaches every decoder
layer, also when gradient checkpointing recomputes the layer in the backward pass.
"""
from typing import List, Optional, Tuple

import torch

# Decoder families whose attention goes through ALL_ATTENTION_FUNCTIONS['sdpa'] with no
# masking of their own; sliding windows are checked in ``supports_varlen``.
VARLEN_LLMS = ('llama', 'mistral', 'qwen2', 'phi3')


def supports_varlen(config) -> bool:
    """Whether an LLM of this HF config can take segment masks: a listed family with SDPA
    attention and no sliding window (a segment attends to its whole prefix). Others get
    a block-diagonal mask (eager) or position ids (flash-attention-2)."""
    if getattr(config, 'model_type', None) not in VARLEN_LLMS:
        return False
    if getattr(config, '_attn_implementation', None) != 'sdpa':
        return False
    if config.model_type == 'qwen2':
        return not getattr(config, 'use_sliding_window', False)
    return getattr(config, 'sliding_window', None) is None


def is_segment_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 1


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment boundaries (flash-attention's ``cu_seqlens``, int32) over the row-major
    flattened (B, T) positions: a segment starts wherever the position id is 0 and at every
    row start; the last entry is B * T."""
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.flatten().nonzero().flatten()
    end = torch.tensor([position_ids.numel()], device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)


def segment_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, segments: torch.Tensor, dropout: float = 0.0,
                           scaling: Optional[float] = None) -> Tuple[torch.Tensor, None]:
    """q/k/v (B, H, T, D) -> (B, T, H, D), causal inside each segment of ``segments``
    (``segment_starts``); returns what transformers' ``sdpa_attention_forward`` returns."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if query.shape[2] != key.shape[2]:
        raise ValueError('segment masks are for training batches, not a KV cache '
                         f'({query.shape[2]} queries, {key.shape[2]} keys)')
    groups = getattr(module, 'num_key_value_groups', 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, length, dim = query.shape
    # (1, H, B*T, D): a view for a flattened batch (B = 1), one copy otherwise
    q, k, v = (x.transpose(0, 1).reshape(1, heads, batch * length, -1) for x in (query, key, value))
    # split, not slicing: a slice's backward writes its gradient into a zero tensor of the
    # full row, which per segment makes the backward quadratic in the segment count
    lengths: List[int] = segments.diff().tolist()
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True)
        for qs, ks, vs in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def pass_segment_masks_v5() -> None:
    """transformers 5 builds every decoder's mask in ``masking_utils.create_causal_mask``
    (and its sliding-window sibling), which ends in the mask function registered for the
    attention implementation, ``ALL_MASK_ATTENTION_FUNCTIONS['sdpa']``: let that return a
    segment mask (1-D) unchanged, so it reaches the SDPA attention function as the mask.
    Every other mask keeps upstream's path. Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS['sdpa']
    if hasattr(sdpa_mask, 'passes_segments'):
        return

    def segment_or_sdpa_mask(*args, attention_mask=None, **kwargs):
        if is_segment_mask(attention_mask):
            return attention_mask
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    segment_or_sdpa_mask.passes_segments = sdpa_mask
    ALL_MASK_ATTENTION_FUNCTIONS['sdpa'] = segment_or_sdpa_mask
