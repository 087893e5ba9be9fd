# MG-LLaVA pretrain with yi34b (template from the LLM base).
_base_ = ['../_base_/recipes/mgllava_pretrain.py', '../_base_/llms/yi34b.py']
# 34B weights (69 GB in bf16) do not fit one 80 GB GPU beside the activations: shard them
deepspeed = 'zero3'
