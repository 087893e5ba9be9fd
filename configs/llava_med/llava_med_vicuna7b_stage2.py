# LLaVA-Med stage 2 with vicuna7b; --load-from the llava_med_vicuna7b_stage1 checkpoint.
_base_ = ['../_base_/recipes/llava_med_stage2.py', '../_base_/llms/vicuna7b.py']
