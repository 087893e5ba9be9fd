# LLaVA-1.5 stage 2 (instruction tuning on the 665K mix) with vicuna7b; --load-from the stage-1 checkpoint.
_base_ = ['../_base_/recipes/llava15_finetune.py', '../_base_/llms/vicuna7b.py']
