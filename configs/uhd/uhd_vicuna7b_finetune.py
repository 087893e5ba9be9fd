# LLaVA-UHD finetune with vicuna7b; --load-from the uhd_vicuna7b_pretrain checkpoint.
_base_ = ['../_base_/recipes/uhd_finetune.py', '../_base_/llms/vicuna7b.py']
