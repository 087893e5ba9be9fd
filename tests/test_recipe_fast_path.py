"""Every shipped recipe trains on the benchmarked fast path by default: padding-free batches
(``flat_llava_collate``), the offline token cache (built on first use), the memory plan's
recompute policy (``gradient_checkpointing='auto'``) and the compiled RMSNorm / SwiGLU
(``fused_elementwise``); one override goes back to padding."""
import glob
import os.path as osp

import pytest

from mllm.engine.config import CONFIG_ROOT, load_config

FAMILIES = ('llava15', 'llava_med', 'convllava', 'mgllava', 'uhd')
RECIPES = sorted(p for f in FAMILIES for p in glob.glob(osp.join(CONFIG_ROOT, f, '*.py')))


def test_every_family_has_recipes():
    assert {osp.basename(osp.dirname(p)) for p in RECIPES} == set(FAMILIES)


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: osp.basename(p)[:-3])
def test_recipe_resolves_to_the_fast_path(path):
    cfg = load_config(path)
    loader = cfg.train_dataloader
    assert loader.collate_fn.type == 'mllm.flat_llava_collate'
    # UHD slices lay several image tensors out per image: tokenised per sample instead
    expected_cache = None if cfg.image_processor.type == 'UHDImageProcessor' else 'data/token_cache'
    assert loader.dataset.get('token_cache') == expected_cache
    assert cfg.model.gradient_checkpointing == 'auto'
    assert cfg.model.fused_elementwise is True  # compiled RMSNorm / SwiGLU on CUDA


def test_one_override_goes_back_to_padded_batches():
    cfg = load_config('llava15_vicuna7b_finetune', {
        'train_dataloader.collate_fn.type': 'mllm.llava_collate',
        'train_dataloader.dataset.token_cache': None, 'model.gradient_checkpointing': True})
    assert cfg.train_dataloader.collate_fn.type == 'mllm.llava_collate'
    assert cfg.train_dataloader.dataset.token_cache is None
    assert cfg.model.gradient_checkpointing is True
