# LLaVA-1.5 stage 2 with llama3_8b: a backbone swap is this two-line file.
_base_ = ['../_base_/recipes/llava15_finetune.py', '../_base_/llms/llama3_8b.py']
