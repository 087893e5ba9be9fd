# LLaVA-Pretrain LCS-558K captions (place it under data/llava_pretrain, see data/README.md).
# The `plain` template (image -> caption) overrides the LLM's chat template for stage 1.
train_dataloader = dict(
    batch_size=32,  # per GPU
    num_workers=4,
    persistent_workers=True,
    dataset=dict(type='LLaVADataset',
                 data_path='data/llava_pretrain/blip_laion_cc_sbu_558k.json',
                 image_folder='data/llava_pretrain/images',
                 template='plain',
                 max_length=2048,
                 # tokenised once on first use (progress bar), then read back memory-mapped
                 token_cache='data/token_cache'),
    sampler=dict(type='DefaultSampler', shuffle=True),
    # padding-free batches: the micro-batch's samples in one row, attention per sample
    # (docs/performance.md). Padded batches instead: --cfg-options
    # train_dataloader.collate_fn.type=mllm.llava_collate train_dataloader.dataset.token_cache=None
    # (scoped names: mmengine looks collate functions up in its root registry only)
    collate_fn=dict(type='mllm.flat_llava_collate'),
)
