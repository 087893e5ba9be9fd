# Tiny ConvLLaVA, stage 2 of 3: ConvNeXt stages 3-5 + projector + LLM train.
# --load-from the stage-1 checkpoint.
_base_ = ['./tiny_convllava_synthetic_stage1.py']

model = dict(trainable=['vision_encoder.stages.2', 'vision_encoder.stages.3',
                        'vision_encoder.stage5', 'projector', 'llm'])
optim_wrapper = dict(optimizer=dict(lr=2e-5))
load_from_required = 'the tiny_convllava_synthetic_stage1 checkpoint'
