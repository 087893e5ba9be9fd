# A tiny MG-LLaVA for the demo: the tiny LLaVA's 64-px ViT (8x8 = 64 tokens) becomes the
# low-resolution branch of a 256-px image (bilinearly downsampled), a 4-stage ConvNeXt sees the
# 256 px (stride 32 -> the same 8x8 grid), Conv-Gate fusion, plus one object token per box of
# the synthetic set's boxes.json; everything random-init and trainable.
_base_ = ['./tiny_llava_synthetic.py']

model = dict(
    type='MGLLaVAModel',
    high_res_encoder=dict(type='ConvNeXtEncoder', backend='timm', model_name='convnext_atto',
                          model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))),
    box_pool_size=7,
    box_grid_stage=1,  # RoIAlign on the 32x32 stride-8 grid: 4x less work than stride 4
    trainable=['vision_encoder', 'high_res_encoder', 'projector', 'fusion', 'bbox_projector',
               'llm'])
# data: the synthetic images' native 256 px (the high-resolution tensor) and their boxes
image_processor = dict(size=256, token_stride=32)
train_dataloader = dict(dataset=dict(box_file='data/synthetic/boxes.json', max_boxes=8))
