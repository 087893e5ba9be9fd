# ConvLLaVA-1536 with vicuna7b, stage 2 (ConvNeXt stages 3-5 + projector + LLM, lr 2e-5, ZeRO-3); --load-from the stage-1 checkpoint.
_base_ = ['../_base_/recipes/convllava_stage2.py', '../_base_/llms/vicuna7b.py',
          '../_base_/vision/convnext_large_convllava_1536.py']
