# A tiny LLaVA trained from scratch on the synthetic set: all parts random-init and
# trainable; about 3 minutes on 2 CPU cores (`mllm demo`, 600 steps of batch 32).
# The recipe without an LLM is the base; this file adds the LLM, as any backbone swap does.
_base_ = ['../_base_/recipes/tiny_llava_synthetic.py', '../_base_/llms/tiny_llama.py']
