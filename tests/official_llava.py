"""Builders for golden tests against official LLaVA (llava-torch = haotian-liu/LLaVA) and
XTuner: the real Llama-2/Vicuna tokenizer from the committed vocabulary fixture, official
LLaVA's training-time encoding of a sample, and (below) tiny official LLaVA models."""
import copy
import json
import lzma
import os
from types import SimpleNamespace

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'llama2_tokenizer', 'llama2_vocab.json.xz')


def llama2_tokenizer_dir(folder, legacy: bool) -> str:
    """Write the Llama-2 / Vicuna tokenizer (32,000 pieces; tests/fixtures/llama2_tokenizer)
    into ``folder`` and return it; load it with ``AutoTokenizer.from_pretrained(folder)``.

    ``legacy`` is transformers' flag: True prepends the SentencePiece space to the text after
    every special token (the original Llama tokenizer), False only to the start of the input
    (``legacy: false`` in a checkpoint's tokenizer_config.json). Official LLaVA's
    ``preprocess_v1`` handles both."""
    from transformers import LlamaTokenizer

    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(os.path.join(folder, 'tokenizer_config.json')):
        with open(FIXTURE, 'rb') as f:
            data = json.loads(lzma.decompress(f.read()))
        tokenizer = LlamaTokenizer(vocab={p: i for i, p in enumerate(data['vocab'])},
                                   merges=[tuple(m.split(' ')) for m in data['merges']],
                                   legacy=legacy, add_bos_token=True)
        tokenizer.save_pretrained(folder)
        path = os.path.join(folder, 'tokenizer_config.json')
        with open(path) as f:
            config = json.load(f)
        # transformers does not save `legacy` itself; a checkpoint states it here. 2048:
        # LLaVA-1.5's --model_max_length, which its training passes to the tokenizer.
        config.update(legacy=legacy, add_bos_token=True, add_eos_token=False,
                      model_max_length=2048)
        with open(path, 'w') as f:
            json.dump(config, f, indent=1)
    return folder


def official_encode(sample: dict, tokenizer, version: str):
    """(input_ids, labels) lists that official LLaVA's ``LazySupervisedDataset`` gives for
    ``sample`` (``--version v1`` or ``plain``): ``preprocess_multimodal`` when the sample has
    an image, then ``preprocess``; one IMAGE_TOKEN_INDEX (-200) per image."""
    from tests.helpers import import_llava_train

    train = import_llava_train()
    from llava import conversation as conversation_lib

    # what llava.train.train.train() does for --version: pad = unk, default conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates[version]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    sources = [copy.deepcopy(sample['conversations'])]
    has_image = 'image' in sample
    if has_image:
        data_args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
        sources = train.preprocess_multimodal(sources, data_args)
    out = train.preprocess(sources, tokenizer, has_image=has_image)
    return out['input_ids'][0].tolist(), out['labels'][0].tolist()


# the shipped tiny recipe's parts (configs/_base_/llms/tiny_llama.py, vision/tiny_clip.py)
TINY_LLM = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=352, vocab_size=256, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=False)
TINY_CLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 image_size=64, patch_size=8)


def official_llava_model(folder, seed: int = 0, **llm):
    """A tiny official LLaVA-1.5 (llava-torch's ``LlavaLlamaForCausalLM``, the tiny recipe's
    shapes, ``llm`` overriding TINY_LLM keys, e.g. ``vocab_size=32000`` for the Llama-2
    vocabulary) built as LLaVA's training builds it: the CLIP tower from a local folder
    written with ``save_pretrained`` (``mm_vision_tower``), loaded by the tower's
    ``load_model()``; the mm_projector re-drawn (std 0.2) so it matters. The model is saved
    to ``folder/llava`` (``save_pretrained``, tower included).

    Returns:
        dict: ``model`` (eval mode), ``clip`` (the tower folder), ``llava`` (the saved model).
    """
    import torch
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_llama import LlavaConfig
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip_dir, llava_dir = (os.path.join(str(folder), n) for n in ('clip', 'llava'))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(clip_dir)
        CLIPImageProcessor(size=TINY_CLIP['image_size'],
                           crop_size=TINY_CLIP['image_size']).save_pretrained(clip_dir)
        config = LlavaConfig(**{**TINY_LLM, **llm}, mm_vision_tower=clip_dir,
                             mm_vision_select_layer=-2, mm_vision_select_feature='patch',
                             mm_projector_type='mlp2x_gelu',
                             mm_hidden_size=TINY_CLIP['hidden_size'],
                             mm_patch_merge_type='flat', image_aspect_ratio='pad', use_mm_proj=True)
        model = LlavaLlamaForCausalLM(config)
        model.get_model().vision_tower.load_model()  # as LLaVA's builder.py does
        for p in model.get_model().mm_projector.parameters():
            p.data.normal_(0, 0.2)
    model.eval().save_pretrained(llava_dir)
    return dict(model=model, clip=clip_dir, llava=llava_dir)
