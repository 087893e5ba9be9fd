"""LoRA / QLoRA adapters on the LLM through peft (kept out of the model class)."""
from typing import Optional

from torch import nn


def apply_lora(llm: nn.Module, lora: Optional[dict]) -> nn.Module:
    """Wrap ``llm`` with peft LoRA adapters.

    Args:
        lora: ``dict(r=128, alpha=256, dropout=0.05, target_modules='all-linear')``;
            'all-linear' targets every linear layer except the LM head (as QLoRA does).
    """
    if not lora:
        return llm
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = dict(lora)
    unknown = set(lora) - {'r', 'alpha', 'dropout', 'target_modules', 'bias'}
    if unknown:
        raise ValueError(f'unknown LoRA options {sorted(unknown)}')
    if getattr(llm, 'is_loaded_in_4bit', False) or getattr(llm, 'is_loaded_in_8bit', False):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora.get('r', 128), lora_alpha=lora.get('alpha', 256),
                        lora_dropout=lora.get('dropout', 0.05),
                        target_modules=lora.get('target_modules', 'all-linear'),
                        bias=lora.get('bias', 'none'), task_type='CAUSAL_LM')
    return get_peft_model(llm, config)
