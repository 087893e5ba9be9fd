# MG-LLaVA finetune with vicuna7b (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_finetune.py', '../_base_/llms/vicuna7b.py']
