# MG-LLaVA finetune with vicuna7b: XTuner's `vicuna` template, as MG-LLaVA trains (no system
# prompt, '</s>' + '\n' after each answer), not the LLM base's LLaVA `vicuna_v1`.
_base_ = ['../_base_/recipes/mgllava_finetune.py', '../_base_/llms/vicuna7b.py']
template = 'vicuna'
