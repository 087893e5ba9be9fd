# MG-LLaVA finetune with llama3_8b (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_finetune.py', '../_base_/llms/llama3_8b.py']
