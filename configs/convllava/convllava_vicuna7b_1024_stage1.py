# ConvLLaVA-1024 with vicuna7b, stage 1 (stage 5 + projector, lr 3e-4, ZeRO-2).
_base_ = ['../_base_/recipes/convllava_stage1.py', '../_base_/llms/vicuna7b.py',
          '../_base_/vision/convnext_large_convllava_1024.py']
