# MG-LLaVA finetune with yi34b (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_finetune.py', '../_base_/llms/yi34b.py']
# a full 34B finetune fits 8x80 GB only under ZeRO-3 (`mllm plan` on this config)
deepspeed = 'zero3'
