# LLaVA-1.5 LoRA finetune with vicuna7b; --deepspeed zero3 --load-from the stage-1 checkpoint.
_base_ = ['../_base_/recipes/llava15_finetune_lora.py', '../_base_/llms/vicuna7b.py']
