# ConvLLaVA's encoder at 1536 px: (1536 / 64)^2 = 576 tokens.
_base_ = ['./convnext_large_convllava_768.py']
image_processor = dict(size=1536)
