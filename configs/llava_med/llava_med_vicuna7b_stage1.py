# LLaVA-Med stage 1 with vicuna7b; --load-from a llava15_vicuna7b_finetune checkpoint.
_base_ = ['../_base_/recipes/llava_med_stage1.py', '../_base_/llms/vicuna7b.py']
