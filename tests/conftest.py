"""Shared fixtures: a word-level tokenizer, a tiny LLaVA config (CPU, a few ms per step),
a tiny LLaVA-format data folder and tiny random HF checkpoints written with
``save_pretrained`` so the real loading code runs without network access."""
import copy
import json
import os

import pytest
from PIL import Image

# Words of the tiny data below; build_tokenizer adds the vicuna_v1 template words and digits.
TINY_WORDS = ('What colour is the shape ? It is red green blue yellow . Describe this image '
              'picture shows shown The a circle square cat dog hello there How how many are ! '
              'one two three')

# Llama-style text tower: hidden 64, 2 layers, 4 heads, vocab 256 (the tokenizer fits in it).
TINY_LLM_CONFIG = dict(model_type='llama', hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                       vocab_size=256, max_position_embeddings=256, rope_theta=10000.0,
                       tie_word_embeddings=False)
# CLIP ViT: 32 px, patch 8 -> 4x4 = 16 patch tokens (+ CLS), hidden 32, 2 layers.
TINY_CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, image_size=32, patch_size=8)
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_NUM_VISUAL_TOKENS = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2  # 16


@pytest.fixture(scope='session')
def tiny_tokenizer():
    """Word-level PreTrainedTokenizerFast: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4."""
    from mllm.datasets.synthetic import build_tokenizer
    return build_tokenizer([TINY_WORDS])


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    """``tiny_tokenizer`` saved as a folder, for configs whose tokenizer reads ``pretrained``."""
    path = str(tmp_path_factory.mktemp('tokenizer'))
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_cfg():
    """A fresh ``LLaVAModel`` config dict (with ``type``) for ``MODELS.build``; mutate freely."""
    return dict(
        type='LLaVAModel',
        llm=dict(type='HFCausalLM', config=copy.deepcopy(TINY_LLM_CONFIG),
                 attn_implementation='eager'),
        vision_encoder=dict(type='CLIPVisionEncoder', config=dict(TINY_CLIP_CONFIG),
                            select_layer=-2),
        projector=dict(type='MLPProjector', depth=2),
        trainable=['projector'])


@pytest.fixture
def tiny_image_processor():
    """LLaVA preprocessing at the tiny encoder's resolution (16 visual tokens)."""
    from mllm.datasets.image_processing import LLaVAImageProcessor
    return LLaVAImageProcessor(size=TINY_IMAGE_SIZE, token_stride=TINY_PATCH)


def _turns(*values):
    """LLaVA turns alternating human/gpt."""
    return [{'from': 'human' if i % 2 == 0 else 'gpt', 'value': v} for i, v in enumerate(values)]


def tiny_samples():
    """LLaVA-format samples: three with images (square, wide, tall; one in a subfolder,
    one multi-turn) and one text-only."""
    return [
        dict(id='s0', image='red.png',
             conversations=_turns('<image>\nWhat colour is the shape?', 'It is red.')),
        dict(id='s1', image='sub/wide.png',
             conversations=_turns('Describe this image.\n<image>',
                                  'The picture shows a blue circle.',
                                  'How many are there?', 'one')),
        dict(id='s2', conversations=_turns('hello there!', 'hello!')),
        dict(id='s3', image='tall.png',
             conversations=_turns('<image>\nWhat shape is shown?', 'a green square')),
    ]


@pytest.fixture
def tiny_llava_files(tmp_path):
    """A LLaVA data folder: ``images/`` (PNGs) plus the same samples as .json and .jsonl.

    Returns dict(root=, image_folder=, json=, jsonl=, samples=).
    """
    image_folder = tmp_path / 'images'
    (image_folder / 'sub').mkdir(parents=True)
    Image.new('RGB', (32, 32), (255, 0, 0)).save(image_folder / 'red.png')
    Image.new('RGB', (40, 20), (0, 0, 255)).save(image_folder / 'sub' / 'wide.png')
    Image.new('RGB', (20, 40), (0, 255, 0)).save(image_folder / 'tall.png')
    samples = tiny_samples()
    json_path, jsonl_path = tmp_path / 'data.json', tmp_path / 'data.jsonl'
    json_path.write_text(json.dumps(samples, indent=1))
    jsonl_path.write_text(''.join(json.dumps(s) + '\n' for s in samples))
    return dict(root=str(tmp_path), image_folder=str(image_folder), json=str(json_path),
                jsonl=str(jsonl_path), samples=samples)


@pytest.fixture(scope='session')
def saved_tiny_checkpoints(tmp_path_factory, tiny_tokenizer):
    """Tiny random HF checkpoints on disk: a LlamaForCausalLM (with the tokenizer saved
    next to it, as real checkpoints ship) and a CLIPVisionModel.

    Returns dict(llm=, vision=, tokenizer=) folder paths.
    """
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    root = tmp_path_factory.mktemp('checkpoints')
    llm_dir, vision_dir = str(root / 'tiny-llama'), str(root / 'tiny-clip')
    llm_config = {k: v for k, v in TINY_LLM_CONFIG.items() if k != 'model_type'}
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        LlamaForCausalLM(LlamaConfig(**llm_config)).save_pretrained(llm_dir)
        CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG)).save_pretrained(vision_dir)
    tiny_tokenizer.save_pretrained(llm_dir)
    assert os.path.isfile(os.path.join(llm_dir, 'tokenizer.json'))
    return dict(llm=llm_dir, vision=vision_dir, tokenizer=llm_dir)
