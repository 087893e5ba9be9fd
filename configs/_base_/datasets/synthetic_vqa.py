# The built-in synthetic visual-QA set (`mllm demo` generates it into data/synthetic).
train_dataloader = dict(
    batch_size=32,
    num_workers=0,  # decoding 64-px PNGs is cheaper than worker start-up on 2 cores
    dataset=dict(type='LLaVADataset',
                 data_path='data/synthetic/train.json',
                 image_folder='data/synthetic/images',
                 max_length=256),
    sampler=dict(type='DefaultSampler', shuffle=True),
    # scoped name: mmengine looks collate functions up in its root registry only
    collate_fn=dict(type='mllm.llava_collate'),
)
val_data = dict(data_path='data/synthetic/val.json', image_folder='data/synthetic/images')
