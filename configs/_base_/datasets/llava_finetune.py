# LLaVA-1.5 instruction mix (665K; data/llava_finetune, see data/README.md), grouped by
# modality and length as LLaVA-1.5 does.
train_dataloader = dict(
    batch_size=16,  # per GPU
    num_workers=4,
    persistent_workers=True,
    dataset=dict(type='LLaVADataset',
                 data_path='data/llava_finetune/llava_v1_5_mix665k.json',
                 image_folder='data/llava_finetune',
                 max_length=2048,
                 # tokenised once on first use (progress bar), then read back memory-mapped
                 token_cache='data/token_cache'),
    sampler=dict(type='LengthGroupedSampler', length_property='modality_length'),
    # padding-free batches: the micro-batch's samples in one row, attention per sample
    # (docs/performance.md). Padded batches instead: --cfg-options
    # train_dataloader.collate_fn.type=mllm.llava_collate train_dataloader.dataset.token_cache=None
    # (scoped names: mmengine looks collate functions up in its root registry only)
    collate_fn=dict(type='mllm.flat_llava_collate'),
)
