# ConvLLaVA's encoder at 1024 px: (1024 / 64)^2 = 256 tokens.
_base_ = ['./convnext_large_convllava_768.py']
image_processor = dict(size=1024)
