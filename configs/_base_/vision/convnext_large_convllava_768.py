# ConvLLaVA's encoder (seed 000): LAION CLIP ConvNeXt-Large (depths 3-3-27-3, dims 192..1536,
# stride 32, 196.2 M) + a random-init 5th stage (LayerNorm + Conv k2 s2 to 3072, 6 blocks,
# 472.9 M) -> stride 64: (768 / 64)^2 = 144 tokens of width 3072.
# No public HF id is pinned here: point `vision_encoder.pretrained` at a local HF ConvNextModel
# folder of the CLIP ConvNeXt-L trunk (e.g. the converted open_clip convnext_large_d_320); the
# architecture below is what `mllm inspect` builds and what a random init uses.
vision_encoder = dict(
    type='ConvNeXtEncoder',
    backend='hf',
    config=dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]),
    extra_stage=dict(channels=3072, depth=6),
)
# CLIP mean/std; pad to square with the mean colour (ConvLLaVA's default); set
# image_processor.keep_aspect=True for any aspect ratio: ceil(W / 64) * ceil(H / 64) tokens
image_processor = dict(type='LLaVAImageProcessor', size=768, token_stride=64)
