# LLaVA-Med stage 2: biomedical instruction tuning (projector + LLM), 3 epochs on the 60K
# inline-mention set, from the stage-1 checkpoint. For a downstream finetune (the seed:
# up to 9 epochs help) point data_path at the task and set train_cfg.max_epochs.
_base_ = ['./llava15_finetune.py']

train_dataloader = dict(dataset=dict(
    data_path='data/llava_med/llava_med_instruct_60k_inline_mention.json',
    image_folder='data/llava_med/images'))
train_cfg = dict(max_epochs=3)

load_from_required = 'the LLaVA-Med stage-1 checkpoint (iter_N.pth of llava_med_<llm>_stage1)'
