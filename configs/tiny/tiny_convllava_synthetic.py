# A tiny ConvLLaVA-style model for the demo: the tiny LLaVA with its 64-px ViT (8x8 = 64
# tokens) replaced by a 4-stage ConvNeXt at 256 px (stride 32 -> 8x8 = 64 tokens), so both see
# the image through the same number of visual tokens; everything random-init and trainable.
_base_ = ['./tiny_llava_synthetic.py']

# model: timm's convnext_atto block layout, shrunk to one block per stage, dims 16..128
vision_encoder = dict(
    _delete_=True,
    type='ConvNeXtEncoder',
    backend='timm',
    model_name='convnext_atto',
    model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
)
# data: the synthetic images' native 256 px, where the fine detail is legible
image_processor = dict(size=256, token_stride=32)
