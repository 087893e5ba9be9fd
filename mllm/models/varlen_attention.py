"""Attention over packed / flattened batches without a dense mask: one causal SDPA call
per sample segment.

A packed batch (``packed_llava_collate``, ``flat_llava_collate``) holds several samples
per row, with position ids restarting at 0 for each. A block-diagonal T x T mask gives
each sample its own causal attention, but it is built and read in full (quadratic in the
row length, the whole row for a flattened batch) and SDPA cannot skip the causal upper
triangle. Here each segment runs ``scaled_dot_product_attention(is_causal=True)`` on its
own slice of q/k/v: attention costs what the samples need, no mask is ever built.

Registered in transformers' ``ALL_ATTENTION_FUNCTIONS`` under ``VARLEN_ATTENTION``;
``LLaVAModel`` switches a supported LLM to it for the forward pass of a packed batch and
passes the segment boundaries as ``cu_seq_lens_q`` (the flash-attention kwarg that
transformers 4.48 hands through the decoder to the attention function).
"""
from typing import List, Optional, Tuple

import torch

VARLEN_ATTENTION = 'mllm_varlen'

# Decoder families whose attention goes through ALL_ATTENTION_FUNCTIONS with no extra
# masking of their own; sliding windows are checked in ``supports_varlen``.
VARLEN_LLMS = ('llama', 'mistral', 'qwen2', 'phi3')


def supports_varlen(config) -> bool:
    """Whether an LLM of this HF config can run ``VARLEN_ATTENTION`` exactly: a listed
    family with 'sdpa' or 'eager' attention and no sliding window (the per-segment call
    attends to the whole segment prefix)."""
    if getattr(config, 'model_type', None) not in VARLEN_LLMS:
        return False
    if getattr(config, '_attn_implementation', None) not in ('sdpa', 'eager'):
        return False
    if config.model_type == 'qwen2':
        return not getattr(config, 'use_sliding_window', False)
    return getattr(config, 'sliding_window', None) is None


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries (flash-attention's ``cu_seqlens``) over the row-major
    flattened (B, T) positions: a segment starts wherever the position id is 0 and at every
    row start, and the last entry is B * T."""
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.flatten().nonzero().flatten()
    end = torch.tensor([position_ids.numel()], device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          dropout: float = 0.0, scaling: Optional[float] = None,
                          cu_seq_lens_q: Optional[torch.Tensor] = None,
                          **kwargs) -> Tuple[torch.Tensor, None]:
    """q/k/v (B, H, T, D) -> (B, T, H, D), causal inside each segment of ``cu_seq_lens_q``
    (``segment_starts``); the signature of transformers' ``sdpa_attention_forward``."""
    if cu_seq_lens_q is None or attention_mask is not None:
        raise ValueError(f'{VARLEN_ATTENTION} attention needs cu_seq_lens_q (segment starts) '
                         'and no attention mask; LLaVAModel passes them for packed batches')
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, 'num_key_value_groups', 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, length, dim = query.shape
    # (1, H, B*T, D): a view for a flattened batch (B = 1), one copy otherwise
    q, k, v = (x.transpose(0, 1).reshape(1, heads, batch * length, -1) for x in (query, key, value))
    # split, not slicing: a slice's backward writes its gradient into a zero tensor of the
    # full row, which per segment makes the backward quadratic in the segment count
    lengths: List[int] = cu_seq_lens_q.diff().tolist()
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True)
        for qs, ks, vs in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def register_varlen_attention() -> None:
    """Add ``VARLEN_ATTENTION`` to transformers' attention functions and keep the decoders
    from building a causal mask for it (``mllm.engine.patches.varlen_skips_causal_mask``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mllm.engine.patches import varlen_skips_causal_mask

    ALL_ATTENTION_FUNCTIONS.setdefault(VARLEN_ATTENTION, varlen_sdpa_attention)
    varlen_skips_causal_mask(VARLEN_ATTENTION)
