# LLaVA-1.5 stage 2 with phi3_mini: a backbone swap is this two-line file.
_base_ = ['../_base_/recipes/llava15_finetune.py', '../_base_/llms/phi3_mini.py']
