# A tiny random-init CLIP ViT (64 px, patch 8 -> 8x8 = 64 tokens) for CPU demos and tests.
vision_encoder = dict(
    type='CLIPVisionEncoder',
    config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, image_size=64, patch_size=8),
    select_layer=-2,
)
image_processor = dict(type='LLaVAImageProcessor', size=64, token_stride=8)
