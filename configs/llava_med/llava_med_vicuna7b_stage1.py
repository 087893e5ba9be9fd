# LLaVA-Med stage 1 with vicuna7b, from the released LLaVA-1.5-7B:
#   mllm convert hf-to-pth llava_med_vicuna7b_stage1 /models/llava-v1.5-7b llava15_7b.pth
#   mllm train llava_med_vicuna7b_stage1 --load-from llava15_7b.pth
# (or --load-from an iter_N.pth of llava15_vicuna7b_finetune).
_base_ = ['../_base_/recipes/llava_med_stage1.py', '../_base_/llms/vicuna7b.py']
