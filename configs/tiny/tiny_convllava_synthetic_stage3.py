# Tiny ConvLLaVA, stage 3 of 3: projector + LLM train, the encoder is frozen.
# --load-from the stage-2 checkpoint.
_base_ = ['./tiny_convllava_synthetic_stage2.py']

model = dict(trainable=['projector', 'llm'])
load_from_required = 'the tiny_convllava_synthetic_stage2 checkpoint'
