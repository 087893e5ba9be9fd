# CLIP ViT-L/14-336 (LLaVA-1.5): 24x24 = 576 patch tokens of width 1024, layer -2, no CLS.
vision_encoder = dict(
    type='CLIPVisionEncoder',
    pretrained='openai/clip-vit-large-patch14-336',
    config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    select_layer=-2,
)
# pad to square with the CLIP mean colour, resize to 336 (no crop)
image_processor = dict(type='LLaVAImageProcessor', size=336, token_stride=14)
