# ConvLLaVA stage 2, vision-language pretraining (seed 000): ConvNeXt stages 3-5, the
# projector and the LLM train (stem and stages 1-2 stay frozen). lr 2e-5, global batch 256,
# 1 epoch; ZeRO-3. Start from stage 1: `--load-from work_dirs/<stage-1 run>/iter_N.pth`.
# NOTE: the seed names no stage-2 data beyond "vision-language pretraining"; the LLaVA
# caption set stands in for it: point train_dataloader.dataset at your caption mix.
_base_ = ['./convllava_stage1.py']

# model: `stages.2`, `stages.3` are ConvNeXt stages 3 and 4 (0-based), `stage5` the new one
model = dict(trainable=['vision_encoder.stages.2', 'vision_encoder.stages.3',
                        'vision_encoder.stage5', 'projector', 'llm'])

# schedule: global batch = 8 GPUs x 16 per GPU x 2 accumulation steps (the LLM trains too)
train_dataloader = dict(batch_size=16)
optim_wrapper = dict(optimizer=dict(lr=2e-5), accumulative_counts=2)

deepspeed = 'zero3'
load_from_required = 'the ConvLLaVA stage-1 checkpoint (iter_N.pth of convllava_<llm>_<res>_stage1)'
