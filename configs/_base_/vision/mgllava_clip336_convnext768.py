# MG-LLaVA's two vision branches (seed 002): CLIP ViT-L/14-336 sees the 768-px image
# bilinearly downsampled to 336 px (24x24 = 576 patch tokens, width 1024, layer -2); open_clip's
# CLIP-ConvNeXt-Large-d-320 sees it at 768 px (stride 32 -> the same 24x24 grid, width 1536,
# stage maps 192 + 384 + 768 + 1536 = 2880 channels for the object tokens).
_base_ = ['./clip_vit_l_336.py']  # vision_encoder: the low-resolution branch

# `pretrained`: a local open_clip weights file of convnext_large_d_320 (e.g. the
# open_clip_pytorch_model.bin of laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup);
# None builds the architecture with random weights.
high_res_encoder = dict(
    type='ConvNeXtEncoder',
    backend='open_clip',
    model_name='convnext_large_d_320',
    pretrained=None,
)
# the image tensor is the high-resolution one: pad to square (CLIP mean colour), resize to 768;
# 768 / 32 = 24 -> 576 grid tokens per image, plus one token per box
image_processor = dict(size=768, token_stride=32)
