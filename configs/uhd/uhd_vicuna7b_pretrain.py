# LLaVA-UHD pretrain with vicuna7b.
_base_ = ['../_base_/recipes/uhd_pretrain.py', '../_base_/llms/vicuna7b.py']
