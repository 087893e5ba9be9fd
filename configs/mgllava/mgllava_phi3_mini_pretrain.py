# MG-LLaVA pretrain with phi3_mini (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_pretrain.py', '../_base_/llms/phi3_mini.py']
