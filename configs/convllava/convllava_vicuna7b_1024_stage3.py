# ConvLLaVA-1024 with vicuna7b, stage 3 (projector + LLM, lr 2e-5, ZeRO-2); --load-from the stage-2 checkpoint.
_base_ = ['../_base_/recipes/convllava_stage3.py', '../_base_/llms/vicuna7b.py',
          '../_base_/vision/convnext_large_convllava_1024.py']
