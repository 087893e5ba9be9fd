# LLaVA-UHD finetune with vicuna13b; --load-from the uhd_vicuna13b_pretrain checkpoint.
_base_ = ['../_base_/recipes/uhd_finetune.py', '../_base_/llms/vicuna13b.py']
