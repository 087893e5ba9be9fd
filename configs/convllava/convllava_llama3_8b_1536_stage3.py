# ConvLLaVA-1536 stage 3 with llama3_8b: the stage-3 recipe family with another LLM base.
_base_ = ['../_base_/recipes/convllava_stage3.py', '../_base_/llms/llama3_8b.py',
          '../_base_/vision/convnext_large_convllava_1536.py']
