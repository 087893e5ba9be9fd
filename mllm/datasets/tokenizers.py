"""Tokenizers from config dicts, from local files only."""
from transformers import AutoTokenizer

from mllm.hf_utils import from_pretrained_locally


def build_tokenizer(cfg):
    """Tokenizer from ``dict(pretrained=..., **kwargs)`` (local files only) or an instance."""
    if not isinstance(cfg, dict) and not hasattr(cfg, 'items'):
        return cfg  # already a tokenizer
    cfg = dict(cfg)
    cfg.pop('type', None)
    pretrained = cfg.pop('pretrained')
    cfg.setdefault('trust_remote_code', False)
    tokenizer = from_pretrained_locally(AutoTokenizer, pretrained, 'tokenizer', **cfg)
    if tokenizer.pad_token_id is None:
        # Many LLaMA-family tokenizers ship without a pad token; padded positions are
        # masked out of attention and loss, so any id works and unk/eos is conventional.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
