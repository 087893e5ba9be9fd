# LLaVA-1.5 instruction mix (665K; data/llava_finetune, see data/README.md), grouped by
# modality and length as LLaVA-1.5 does.
train_dataloader = dict(
    batch_size=16,  # per GPU
    num_workers=4,
    persistent_workers=True,
    dataset=dict(type='LLaVADataset',
                 data_path='data/llava_finetune/llava_v1_5_mix665k.json',
                 image_folder='data/llava_finetune',
                 max_length=2048),
    sampler=dict(type='LengthGroupedSampler', length_property='modality_length'),
    # scoped name: mmengine looks collate functions up in its root registry only
    collate_fn=dict(type='mllm.llava_collate'),
)
