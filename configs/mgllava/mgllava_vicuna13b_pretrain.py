# MG-LLaVA pretrain with vicuna13b (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_pretrain.py', '../_base_/llms/vicuna13b.py']
