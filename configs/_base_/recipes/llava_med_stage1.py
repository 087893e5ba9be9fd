# LLaVA-Med stage 1: biomedical concept alignment on figure-caption pairs, projector only,
# continuing from a general LLaVA-1.5 model (seed 001). Hyper-parameters follow LLaVA-1.5
# stage 1; the LLM's chat template is kept because the starting model is a chat model.
_base_ = ['./llava15_pretrain.py']

train_dataloader = dict(dataset=dict(
    data_path='data/llava_med/llava_med_alignment_500k.json',
    image_folder='data/llava_med/images',
    template=None))  # None: the LLM's template (bound at load time)

# `mllm train` refuses to start without --load-from (or load_from=...) when this is set.
# The released LLaVA-1.5 is imported once: `mllm convert hf-to-pth llava_med_<llm>_stage1
# /models/llava-v1.5-7b OUT.pth` (docs/weights.md), then --load-from OUT.pth.
load_from_required = ('a LLaVA-1.5 model: the released one imported with `mllm convert hf-to-pth CONFIG /models/llava-v1.5-7b OUT.pth`, or iter_N.pth of llava15_<llm>_finetune')
