# LLaVA-1.5 stage 2 (seed 001): lr 2e-5, global batch 128, 1 epoch, warmup 0.03, cosine, wd 0.
_base_ = ['./llava15_pretrain.py']
# global batch = 8 GPUs x 16 per GPU x 1 accumulation step
optim_wrapper = dict(optimizer=dict(lr=2e-5))
