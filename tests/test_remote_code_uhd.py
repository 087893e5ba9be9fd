"""``--format remote_code`` for LLaVA-UHD: plain transformers (``AutoModelForCausalLM`` /
``AutoProcessor`` with ``trust_remote_code=True``, in a process that cannot import mllm) loads
the tiny UHD from the files written next to the weights; on an image cut into several slices
of another shape than its overview, its prompt ids (separators as ids), slices, logits and
generated ids equal mllm's."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.cli import main

from conftest import TINY_WORDS
from test_chat_export import save_checkpoint, tiny_cfg
from test_hf_clients import run_remote_code_client

UHD = 'configs/tiny/tiny_uhd_synthetic.py'  # 64 px ViT patch 16, 4 queries, ',' / '.' separators
IMAGE_TOKEN_ID = 4  # the tiny tokenizer's <image>


@pytest.fixture(scope='module')
def uhd_tokenizer_dir(tmp_path_factory):
    """The tiny word-level tokenizer with ',' (the config's between-slices separator)."""
    from mllm.datasets.synthetic import build_tokenizer

    path = str(tmp_path_factory.mktemp('uhd_tokenizer'))
    build_tokenizer([TINY_WORDS + ' ,']).save_pretrained(path)
    return path


def test_uhd_remote_code_export_gives_mllm_logits(tmp_path, uhd_tokenizer_dir):
    from mllm.datasets.slicing import SliceLayout
    from mllm.datasets.templates import stop_token_id
    from mllm.inference.inference import load_for_inference, load_image, prompt_inputs

    options = {'tokenizer.pretrained': uhd_tokenizer_dir}
    ckpt = save_checkpoint(tiny_cfg(uhd_tokenizer_dir, config=UHD), tmp_path / 'iter_1.pth')
    out = tmp_path / 'remote'
    assert main(['convert', 'pth-to-hf', UHD, ckpt, str(out), '--format', 'remote_code',
                 '--cfg-options', f'tokenizer.pretrained={uhd_tokenizer_dir}']) == 0
    config_json = (out / 'config.json').read_text()
    assert '.MllmUhdForCausalLM"' in config_json and 'trust_remote_code' not in config_json
    assert 'modeling_mllm_uhd.MllmUhdProcessor' in (out / 'processor_config.json').read_text()
    # 200 x 120 px: 2 x 3 slices of 64 x 48 px and an 80 x 48 px overview
    image = tmp_path / 'wide.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 200, 3),
                                                      dtype=np.uint8)).save(image)
    question = 'What colour is the shape?'
    job = dict(folder=str(out), image=str(image), max_new_tokens=6,
               messages=[{'role': 'user', 'content': f'<image>\n{question}'}])
    got, theirs = run_remote_code_client(tmp_path, job)
    assert got['model_class'] == 'MllmUhdForCausalLM'

    model, tokenizer, processor, template = load_for_inference(UHD, ckpt, options)
    pil = load_image(str(image))
    (layout,) = processor.num_visual_tokens(pil.size)
    assert isinstance(layout, SliceLayout) and (layout.rows, layout.cols) == (2, 3)
    batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{question}'}], tokenizer,
                          template, processor, pil)
    ids = batch['input_ids'][0]
    assert got['ids'] == ids.masked_fill(ids == -200, IMAGE_TOKEN_ID).tolist()
    assert int((ids == -200).sum()) == 7 * 4  # 6 slices + the overview, 4 tokens each
    units = [u[:, :h, :w] for u, (h, w) in zip(theirs['pixel_values'],
                                                 theirs['image_sizes'].tolist())]
    assert [tuple(u.shape) for u in units] == [(3, 48, 64)] * 6 + [(3, 48, 80)]
    for theirs_unit, ours_unit in zip(units, batch['pixel_values']):
        torch.testing.assert_close(theirs_unit, ours_unit, rtol=0, atol=0)
    with torch.no_grad():
        ours = model(batch['input_ids'], attention_mask=batch['attention_mask'],
                     pixel_values=batch['pixel_values'], mode='tensor')
        new = model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                             pixel_values=batch['pixel_values'], max_new_tokens=6,
                             eos_token_id=stop_token_id(tokenizer, template),
                             pad_token_id=tokenizer.pad_token_id)
    diff = float((theirs['logits'][..., :ours.shape[-1]] - ours).abs().max())
    assert diff <= 1e-5 * float(ours.abs().max()), diff  # eager (mllm's tiny config) vs SDPA
    assert got['new_ids'] == new[0].tolist()


def test_uhd_remote_code_needs_the_slicing_processor(uhd_tokenizer_dir):
    """A CLIP + resampler model whose data was not sliced has no UHD processor to export."""
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.inference.export import export_remote_code
    from mllm.registry import MODELS

    cfg = tiny_cfg(uhd_tokenizer_dir, config=UHD)
    with pytest.raises(ValueError, match='not the UHDImageProcessor'):
        export_remote_code(cfg, MODELS.build(cfg.model), None, LLaVAImageProcessor(64, 16),
                           'unused')
