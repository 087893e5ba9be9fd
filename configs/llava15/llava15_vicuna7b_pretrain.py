# LLaVA-1.5 stage 1 (projector alignment on LCS-558K) with vicuna7b.
_base_ = ['../_base_/recipes/llava15_pretrain.py', '../_base_/llms/vicuna7b.py']
