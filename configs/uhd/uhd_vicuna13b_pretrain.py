# LLaVA-UHD pretrain with vicuna13b.
_base_ = ['../_base_/recipes/uhd_pretrain.py', '../_base_/llms/vicuna13b.py']
