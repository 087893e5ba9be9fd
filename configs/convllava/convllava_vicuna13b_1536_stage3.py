# ConvLLaVA-1536 stage 3 with vicuna13b: the stage-3 recipe family with another LLM base.
_base_ = ['../_base_/recipes/convllava_stage3.py', '../_base_/llms/vicuna13b.py',
          '../_base_/vision/convnext_large_convllava_1536.py']
