"""Released checkpoints in (``mllm convert hf-to-pth``), strictly (``--load-from``).

Sources are tiny random models written in each release's own layout: original LLaVA with the
official code (``llava-torch`` = haotian-liu/LLaVA, its ``LlavaLlamaForCausalLM`` runs under
our transformers), llava-hf with transformers' ``LlavaForConditionalGeneration``, ConvLLaVA's
tower with the transformers classes its ``add_stage`` uses; MG-LLaVA and LLaVA-UHD as state
dicts with their official key names (their code needs CUDA-era forks: not run here).
"""
import os

import pytest
import torch

from tests.helpers import TINY, run_mllm

# the shipped tiny recipe's parts (configs/_base_/llms/tiny_llama.py, vision/tiny_clip.py)
LLM = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=352, vocab_size=256, rope_theta=10000.0,
           max_position_embeddings=512, tie_word_embeddings=False)
CLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            image_size=64, patch_size=8)
TOKENS = (64 // 8) ** 2


def _cfg(config=TINY, **options):
    """A config with overrides, ``a__b=v`` for ``a.b=v``."""
    from mllm.engine.config import load_config
    return load_config(config, {k.replace('__', '.'): v for k, v in options.items()})


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """A tiny official LLaVA-1.5 (llava.model.LlavaLlamaForCausalLM) saved with
    save_pretrained, its CLIP tower folder (mm_vision_tower) and its stage-1 mm_projector.bin,
    plus the same LLM alone as a Hugging Face folder."""
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_llama import LlavaConfig
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                              LlamaConfig, LlamaForCausalLM)

    root = tmp_path_factory.mktemp('official')
    clip_dir, llava_dir, llm_dir = (str(root / n) for n in ('clip', 'llava', 'llm'))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(clip_dir)
        CLIPImageProcessor(size=64, crop_size=64).save_pretrained(clip_dir)
        config = LlavaConfig(**LLM, mm_vision_tower=clip_dir, mm_vision_select_layer=-2,
                             mm_vision_select_feature='patch', mm_projector_type='mlp2x_gelu',
                             mm_hidden_size=CLIP['hidden_size'], mm_patch_merge_type='flat',
                             image_aspect_ratio='pad', use_mm_proj=True)
        model = LlavaLlamaForCausalLM(config)
        model.get_model().vision_tower.load_model()  # as LLaVA's builder.py does
        # the projector of a trained model is not at its init: make it count
        for p in model.get_model().mm_projector.parameters():
            p.data.normal_(0, 0.2)
        LlamaForCausalLM(LlamaConfig(**LLM)).save_pretrained(llm_dir)
    model.eval().save_pretrained(llava_dir)
    from safetensors.torch import load_file, save_file
    no_tower = root / 'no_tower'
    no_tower.mkdir()
    state = load_file(os.path.join(llava_dir, 'model.safetensors'))
    save_file({k: v for k, v in state.items() if '.vision_tower.' not in k},
              str(no_tower / 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(llava_dir, 'config.json')) as f, \
            open(no_tower / 'config.json', 'w') as g:
        g.write(f.read())
    torch.save({f'model.mm_projector.{k}': v for k, v in
                model.get_model().mm_projector.state_dict().items()},
               str(root / 'mm_projector.bin'))
    return dict(model=model, clip=clip_dir, llava=llava_dir, llm=llm_dir, no_tower=str(no_tower),
                projector=str(root / 'mm_projector.bin'), root=root)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, 64, 64, generator=g)
    text = [1, 5, 9, 200, 7, 8]
    return pixels, text


def _ours(cfg, checkpoint, pixels, text, image_at=2):
    from mllm.inference.loading import load_model
    model = load_model(cfg, checkpoint)
    ids = torch.tensor([text[:image_at] + [-200] * TOKENS + text[image_at:]])
    with torch.no_grad():
        return model(ids, pixel_values=pixels, mode='tensor')


def test_original_llava_folder_imports_with_equal_logits(official, tmp_path):
    from mllm.inference.importers import import_checkpoint

    pixels, text = _inputs()
    ids = torch.tensor([text[:2] + [-200] + text[2:]])  # official: one -200 per image
    with torch.no_grad():
        reference = official['model'](input_ids=ids, images=pixels).logits
    # save_pretrained writes the (frozen) tower with the model; a folder without it takes
    # the tower from the config's vision_encoder.pretrained, as LLaVA's builder.py does
    no_tower = official['no_tower']
    # the tiny recipe trains every part; LLaVA-1.5's finetune freezes the tower
    cfg = _cfg(vision_encoder__pretrained=official['clip'], model__trainable=['projector', 'llm'])
    for src, from_config in ((official['llava'], []), (str(no_tower), ['vision_encoder'])):
        out = str(tmp_path / f'{os.path.basename(src)}.pth')
        result = import_checkpoint(cfg, src, out)
        assert result.layout == 'llava' and result.from_config == from_config
        assert os.path.isfile(out + '.sha256')
        # an mllm checkpoint: torch's safe loader reads it; the tower is in it or not
        saved = torch.load(out, weights_only=True)
        assert saved['meta']['trainable_only']
        assert any(k.startswith('vision_encoder') for k in saved['state_dict']) == (not from_config)
        ours = _ours(cfg, out, pixels, text)
        assert ours.shape == reference.shape == (1, len(text) + TOKENS, LLM['vocab_size'])
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_sharded_release_reads_through_its_index(official, tmp_path):
    from mllm.inference.importers import read_source

    official['model'].save_pretrained(str(tmp_path / 'sharded'), max_shard_size='200KB')
    assert os.path.isfile(tmp_path / 'sharded' / 'model.safetensors.index.json')
    sharded, config = read_source(str(tmp_path / 'sharded'))
    whole, _ = read_source(official['llava'])
    assert config['mm_projector_type'] == 'mlp2x_gelu'
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_llava_folder_needs_the_tower_from_pretrained_and_the_same_layer(official, tmp_path):
    from mllm.inference.importers import import_checkpoint

    with pytest.raises(ValueError, match=r'vision_encoder.*get no weight.*pretrained'):
        import_checkpoint(_cfg(), official['no_tower'], str(tmp_path / 'a.pth'))
    with pytest.raises(ValueError, match='vision layer -2, the config -1'):
        import_checkpoint(_cfg(vision_encoder__pretrained=official['clip'],
                               vision_encoder__select_layer=-1),
                          official['llava'], str(tmp_path / 'b.pth'))
    assert not os.path.exists(tmp_path / 'a.pth')


def test_projector_bin_imports_for_stage_two(official, tmp_path):
    from mllm.inference.importers import import_checkpoint

    cfg = _cfg(vision_encoder__pretrained=official['clip'], llm__pretrained=official['llm'])
    out = str(tmp_path / 'projector.pth')
    result = import_checkpoint(cfg, official['projector'], out)
    assert result.layout == 'llava_projector'
    state = torch.load(out, weights_only=True)['state_dict']
    projector = official['model'].get_model().mm_projector
    assert set(state) == {'projector.linear_1.weight', 'projector.linear_1.bias',
                          'projector.linear_2.weight', 'projector.linear_2.bias'}
    assert torch.equal(state['projector.linear_2.weight'], projector[2].weight)
    # without an LLM to take from `pretrained`, the projector alone is not a model
    with pytest.raises(ValueError, match=r'llm.*get no weight'):
        import_checkpoint(_cfg(vision_encoder__pretrained=official['clip']),
                          official['projector'], str(tmp_path / 'x.pth'))


def _llava_hf(folder, legacy=False):
    """A tiny llava-hf model: vocabulary padded past the tokenizer's, as llava-hf adds
    <image> and <pad>; saved in transformers 5's layout, or renamed to 4.x's."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    with torch.random.fork_rng():
        torch.manual_seed(3)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP).to_dict(),
                             text_config=LlamaConfig(**dict(LLM, vocab_size=320)).to_dict(),
                             image_token_index=300, projector_hidden_act='gelu',
                             vision_feature_layer=-2, vision_feature_select_strategy='default')
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    if legacy:
        path = os.path.join(folder, 'model.safetensors')
        state = load_file(path)
        renames = (('model.language_model.', 'language_model.model.'),
                   ('lm_head.', 'language_model.lm_head.'),
                   ('model.vision_tower.', 'vision_tower.vision_model.'),
                   ('model.multi_modal_projector.', 'multi_modal_projector.'))
        old = {}
        for key, value in state.items():
            for new, legacy_prefix in renames:
                if key.startswith(new):
                    key = legacy_prefix + key[len(new):]
                    break
            old[key] = value
        save_file(old, path, metadata={'format': 'pt'})
    return model


@pytest.mark.parametrize('legacy', [False, True], ids=['transformers5', 'transformers4'])
def test_llava_hf_folder_imports_with_equal_logits(tmp_path, legacy):
    from mllm.inference.importers import import_checkpoint

    model = _llava_hf(str(tmp_path / 'hf'), legacy=legacy)
    cfg = _cfg()
    out = str(tmp_path / 'hf.pth')
    result = import_checkpoint(cfg, str(tmp_path / 'hf'), out)
    assert result.layout == 'llava_hf' and result.from_config == []
    assert any('kept the first 256 of 320 rows' in n for n in result.notes)

    pixels, text = _inputs(2)
    ids = torch.tensor([text[:2] + [300] * TOKENS + text[2:]])
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits[..., :LLM['vocab_size']]
    torch.testing.assert_close(_ours(cfg, out, pixels, text), reference, atol=1e-5, rtol=1e-5)


def test_unknown_key_and_wrong_shape_are_named(official, tmp_path):
    from safetensors.torch import load_file, save_file

    from mllm.inference.importers import import_checkpoint

    src = tmp_path / 'odd'
    src.mkdir()
    state = load_file(os.path.join(official['llava'], 'model.safetensors'))
    state['model.image_newline'] = torch.zeros(LLM['hidden_size'])  # LLaVA-1.6 (anyres)
    save_file(state, str(src / 'model.safetensors'))
    with pytest.raises(ValueError, match=r'1 tensors have no place in this model.*image_newline'):
        import_checkpoint(_cfg(vision_encoder__pretrained=official['clip']), str(src),
                          str(tmp_path / 'x.pth'))
    # a 3-layer MLP projector config against the release's mlp2x_gelu
    deeper = _cfg(vision_encoder__pretrained=official['clip'],
                  model__projector=dict(type='MLPProjector', depth=3))
    with pytest.raises(ValueError, match=r'get no weight.*projector.linear_3'):
        import_checkpoint(deeper, official['llava'], str(tmp_path / 'y.pth'))


# ------------------------------------------------------------------ ConvLLaVA

def _official_convnext_5_stages(depth5=1, width5=256):
    """ConvLLaVA's tower as its ConvNeXtCLIPVisionTower builds it: a transformers
    ConvNextModel, then ``add_stage``: ConvNextStage(config, C4, width, depth) appended and
    the config's lists extended (its final LayerNorm keeps the 4-stage width)."""
    from transformers import ConvNextConfig, ConvNextModel
    from transformers.models.convnext.modeling_convnext import ConvNextStage

    tower = ConvNextModel(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128]))
    tower.encoder.stages.append(ConvNextStage(tower.config, 128, width5, depth=depth5))
    tower.config.depths.append(depth5)
    tower.config.hidden_sizes.append(width5)
    tower.config.stage_names.append('stage5')
    tower.config.out_features, tower.config.out_indices = ['stage5'], [5]
    tower.config.num_stages += 1
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    return tower.eval()


def _official_convnext_features(tower, pixels):
    """ConvNeXtCLIPVisionTower.forward: encoder hidden_states[-1] as (B, h*w, C)."""
    with torch.no_grad():
        out = tower.encoder(tower.embeddings(pixels), output_hidden_states=True, return_dict=True)
    features = out.hidden_states[-1].permute(0, 2, 3, 1)
    return features.reshape(features.shape[0], -1, features.shape[3])


def test_official_5_stage_convnext_tower_loads_into_the_hf_backend(tmp_path):
    from mllm.models.convnext import ConvNeXtEncoder

    tower = _official_convnext_5_stages()
    tower.save_pretrained(str(tmp_path / 'tower'))
    assert tower.layernorm.weight.shape[0] == 128  # the width that used to break loading
    encoder = ConvNeXtEncoder(backend='hf', pretrained=str(tmp_path / 'tower'),
                              extra_stage=dict(channels=256, depth=1)).eval()
    assert encoder.stage5_loaded and len(encoder.stages) == 4 and encoder.out_channels == 256
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = encoder(pixels)
    torch.testing.assert_close(ours, _official_convnext_features(tower, pixels), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r'5-stage ConvNeXt.*extra_stage=dict\(channels=256'):
        ConvNeXtEncoder(backend='hf', pretrained=str(tmp_path / 'tower'))


def test_convllava_release_imports_tower_projector_and_llm(official, tmp_path):
    from mllm.inference.importers import import_checkpoint
    from mllm.inference.loading import load_model

    tower = _official_convnext_5_stages()
    llava = official['model']
    state = {k: v for k, v in llava.state_dict().items() if 'vision_tower' not in k}
    state.update({f'model.vision_tower.vision_tower.{k}': v
                  for k, v in tower.state_dict().items()})
    # the released projector reads the 5th stage: 256 channels in
    state['model.mm_projector.0.weight'] = torch.randn(LLM['hidden_size'], 256) * 0.1
    torch.save(state, str(tmp_path / 'pytorch_model.bin'))
    cfg = _cfg('configs/tiny/tiny_convllava_synthetic_stage1.py',
               vision_encoder=dict(_delete_=True, type='ConvNeXtEncoder', backend='hf',
                                              config=dict(depths=[1, 1, 1, 1],
                                                          hidden_sizes=[16, 32, 64, 128]),
                                              extra_stage=dict(channels=256, depth=1)))
    out = str(tmp_path / 'conv.pth')
    result = import_checkpoint(cfg, str(tmp_path / 'pytorch_model.bin'), out)
    assert result.layout == 'convllava'
    assert set(result.dropped) == {'model.vision_tower.vision_tower.layernorm.weight',
                                   'model.vision_tower.vision_tower.layernorm.bias'}
    model = load_model(cfg, out)
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_encoder(pixels),
                                   _official_convnext_features(tower, pixels), atol=0, rtol=0)
    assert torch.equal(model.projector.linear_1.weight, state['model.mm_projector.0.weight'])
    assert torch.equal(model.llm.model.layers[1].mlp.up_proj.weight,
                       state['model.layers.1.mlp.up_proj.weight'])


# ------------------------------------------------------------------ MG-LLaVA, LLaVA-UHD

def test_mgllava_xtuner_state_dict_maps_every_part(official, tmp_path):
    import timm

    from mllm.inference.importers import import_checkpoint
    from mllm.inference.loading import load_model
    from mllm.registry import MODELS

    # the ConvNeXt branch is frozen in MG-LLaVA and never saved: it comes from `pretrained`
    convnext = str(tmp_path / 'convnext_atto.pth')
    torch.save(timm.create_model('convnext_atto', num_classes=0, depths=(1, 1, 1, 1),
                                 dims=(16, 32, 64, 128)).state_dict(), convnext)
    mg = 'configs/tiny/tiny_mgllava_synthetic.py'
    cfg = _cfg(mg, model__high_res_encoder__pretrained=convnext,
               model__trainable=['projector', 'fusion', 'bbox_projector', 'llm'])
    ours = MODELS.build(cfg.model).state_dict()
    # MG-LLaVA's names (mg_llava/module/fuse_model.py: DualPathFuseModule; XTuner's
    # ProjectorModel is model.0 / model.2; the LLM and CLIP as XTuner's state_dict saves them)
    names = {'fuse_module.slow_conv': 'fusion.conv_high',
             'fuse_module.slow_proj': 'fusion.proj_high',
             'fuse_module.fast_conv': 'fusion.dwconv_low',
             'fuse_module.fast_proj': 'fusion.proj_low',
             'fuse_module.gate.0': 'fusion.gate.0', 'fuse_module.gate.2': 'fusion.gate.2',
             'projector.model.0': 'projector.linear_1', 'projector.model.2': 'projector.linear_2',
             'bbox_projector.model.0': 'bbox_projector.linear_1',
             'bbox_projector.model.2': 'bbox_projector.linear_2'}
    release = {}
    for theirs, mine in names.items():
        for param in ('weight', 'bias'):
            release[f'{theirs}.{param}'] = torch.randn(ours[f'{mine}.{param}'].shape)
    release.update({k: torch.randn(v.shape) for k, v in ours.items() if k.startswith('llm.')})
    release.update({'visual_encoder.vision_model.' + k[len('vision_encoder.model.'):]:
                    torch.randn(v.shape) for k, v in ours.items()
                    if k.startswith('vision_encoder.')})
    path = str(tmp_path / 'iter_5000.pth')
    torch.save({'state_dict': release, 'meta': {}}, path)
    out = str(tmp_path / 'mg.pth')
    result = import_checkpoint(cfg, path, out)
    assert result.layout == 'mgllava' and result.from_config == ['high_res_encoder']
    model = load_model(cfg, out)
    state = model.state_dict()
    for theirs, mine in names.items():
        assert torch.equal(state[f'{mine}.weight'], release[f'{theirs}.weight'])
    assert torch.equal(state['llm.lm_head.weight'], release['llm.lm_head.weight'])
    # without the branch's pretrained weights the import names it
    with pytest.raises(ValueError, match=r'\(high_res_encoder\) get no weight'):
        import_checkpoint(_cfg(mg), path, str(tmp_path / 'x.pth'))

    # a LoRA release: XTuner saves peft's adapter-less names; the base LLM is `pretrained`
    lora_cfg = _cfg(mg, model__high_res_encoder__pretrained=convnext,
                    llm__pretrained=official['llm'], model__lora=dict(r=4, alpha=8),
                    model__trainable=['projector', 'fusion', 'bbox_projector'])
    adapters = {k.replace('.default.weight', '.weight'): torch.randn(v.shape)
                for k, v in MODELS.build(lora_cfg.model).state_dict().items() if 'lora_' in k}
    assert next(iter(adapters)).startswith('llm.base_model.model.model.layers.0.')
    lora_release = {k: v for k, v in release.items() if not k.startswith('llm.')}
    torch.save({'state_dict': {**lora_release, **adapters}}, path)
    result = import_checkpoint(lora_cfg, path, out, layout='mgllava')
    assert result.from_config == ['high_res_encoder', 'llm']
    state = load_model(lora_cfg, out).state_dict()
    for key, value in adapters.items():
        assert torch.equal(state[key.replace('.weight', '.default.weight')], value)


def test_uhd_release_resampler_imports_with_equal_outputs(official, tmp_path):
    from mllm.inference.importers import import_checkpoint
    from mllm.inference.loading import load_model
    from tests.fixtures.uhd_release.resampler import Resampler as ReleaseResampler

    # the tiny UHD recipe's resampler (4 queries, width 128, 4 heads) as the release builds it
    torch.manual_seed(0)
    release = ReleaseResampler(grid_size=2, embed_dim=128, num_heads=4, kv_dim=128).eval()
    for p in release.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)  # away from its init
    release.pos_embed.data = ReleaseResampler(2, 128, 4, kv_dim=128).pos_embed.data
    llava = {k: v for k, v in official['model'].state_dict().items() if 'mm_projector' not in k}
    resampler = {f'model.mm_projector.{k}': v for k, v in release.state_dict().items()}
    torch.save({**llava, **resampler}, str(tmp_path / 'pytorch_model.bin'))
    # the official fixture's tower has patch 8 (the tiny UHD recipe's has 16)
    cfg = _cfg('configs/tiny/tiny_uhd_synthetic.py', vision_encoder__pretrained=official['clip'],
               vision_encoder__config__patch_size=8, image_processor__patch=8,
               model__trainable=['projector', 'llm'])
    out = str(tmp_path / 'uhd.pth')
    result = import_checkpoint(cfg, str(tmp_path / 'pytorch_model.bin'), out)
    assert result.layout == 'uhd' and 'model.mm_projector.pos_embed' in result.dropped
    model = load_model(cfg, out)
    for grid in ((8, 8), (6, 10)):
        x = torch.randn(2, grid[0] * grid[1], 128)
        with torch.no_grad():
            torch.testing.assert_close(model.projector(x, grid_size=grid),
                                       release(x, tgt_size=grid), rtol=0, atol=1e-5)
    # a release whose fixed table differs would give other outputs: refused
    resampler['model.mm_projector.pos_embed'] = resampler['model.mm_projector.pos_embed'].flip(0)
    torch.save({**llava, **resampler}, str(tmp_path / 'pytorch_model.bin'))
    with pytest.raises(ValueError, match='position-embedding'):
        import_checkpoint(cfg, str(tmp_path / 'pytorch_model.bin'), str(tmp_path / 'u2.pth'))


# ------------------------------------------------------------------ strict --load-from (CLI)

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=48,
                                  num_val=8)


def _tiny_llava_run_checkpoint(path):
    """What a tiny LLaVA run writes (it trains every part: its tower is in the file)."""
    from mllm.engine.checkpoint import write_checksums
    from mllm.registry import MODELS

    model = MODELS.build(_cfg().model)
    torch.save({'state_dict': model.state_dict(), 'meta': {'trainable_only': True}}, path)
    write_checksums(path)


class _Runner:
    """What StrictLoadHook reads of MMEngine's runner."""

    def __init__(self, model, load_from='ckpt.pth'):
        import logging
        self.model, self._load_from = model, load_from
        self.logger = logging.getLogger('test')


def test_strict_load_names_foreign_keys_and_keeps_stage_hand_overs(official, tmp_path):
    from mllm.engine.runner import StrictLoadHook, refuse_foreign_weights
    from mllm.registry import MODELS

    llava = MODELS.build(_cfg().model)
    projector_bin = torch.load(official['projector'], weights_only=True)
    with pytest.raises(ValueError, match=r'(?s)4 of its 4 tensors match nothing.*'
                       r'model.mm_projector.0.bias.*convert hf-to-pth.*load_from_strict=False'):
        StrictLoadHook().after_load_checkpoint(_Runner(llava), projector_bin)
    StrictLoadHook(strict=False).after_load_checkpoint(_Runner(llava), projector_bin)  # logged

    # a tiny LLaVA run's checkpoint into the tiny ConvLLaVA: its CLIP tower matches nothing
    stage1 = MODELS.build(_cfg('configs/tiny/tiny_convllava_synthetic_stage1.py').model)
    with pytest.raises(ValueError, match=r'match nothing in the model: vision_encoder.model.'):
        StrictLoadHook().after_load_checkpoint(_Runner(stage1), {'state_dict': llava.state_dict()})
    # ConvLLaVA stage 1 -> 2: stage 5 and the projector carry over, the rest is the config's
    stage2 = MODELS.build(_cfg('configs/tiny/tiny_convllava_synthetic_stage2.py').model)
    trained = {k: v for k, v in stage1.state_dict().items()
               if k.startswith(('vision_encoder.stage5', 'projector'))}
    StrictLoadHook().after_load_checkpoint(_Runner(stage2), {'state_dict': trained})
    # ... but stage 2 without stage 1's random-init stage 5 (frozen in stage 3) is refused
    stage3 = MODELS.build(_cfg('configs/tiny/tiny_convllava_synthetic_stage3.py').model)
    no_stage5 = {k: v for k, v in trained.items() if not k.startswith('vision_encoder.stage5')}
    with pytest.raises(ValueError, match=r'frozen parts that start from random weights get no '
                       r'tensor from it \(vision_encoder\): vision_encoder.stage5'):
        StrictLoadHook().after_load_checkpoint(_Runner(stage3), {'state_dict': no_stage5})
    # another width: named with both shapes
    wide = dict(trained, **{'projector.linear_1.weight': torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=r'another shape: projector.linear_1.weight \(128, 64\)'):
        StrictLoadHook().after_load_checkpoint(_Runner(stage2), {'state_dict': wide})

    hf = tmp_path / 'hf'
    _llava_hf(str(hf))
    for path in (str(hf), str(hf / 'model.safetensors')):
        with pytest.raises(ValueError, match='not an mllm checkpoint.*convert hf-to-pth'):
            refuse_foreign_weights(path)


def test_pretrained_folder_that_is_not_the_tower_is_an_error(official, tmp_path):
    from safetensors.torch import load_file, save_file

    from mllm.models.vision import CLIPVisionEncoder

    hf = tmp_path / 'hf'
    _llava_hf(str(hf))
    with pytest.raises(ValueError, match='whole LlavaForConditionalGeneration model, not a CLIP'):
        CLIPVisionEncoder(pretrained=str(hf))
    with pytest.raises(ValueError, match='whole LlavaLlamaForCausalLM'):
        CLIPVisionEncoder(pretrained=official['llava'])
    # a CLIP folder whose weights miss part of the tower: named, not started at random
    partial = tmp_path / 'partial'
    partial.mkdir()
    state = load_file(os.path.join(official['clip'], 'model.safetensors'))
    save_file({k: v for k, v in state.items() if '.layers.2.' not in k},
              str(partial / 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(official['clip'], 'config.json')) as f:
        (partial / 'config.json').write_text(f.read())
    with pytest.raises(ValueError, match=r'does not hold the CLIP vision tower: \d+ of its '
                       r'tensors are missing \(.*layers.2'):
        CLIPVisionEncoder(pretrained=str(partial))
    assert CLIPVisionEncoder(pretrained=official['clip']).loaded_pretrained


@pytest.mark.slow
def test_load_from_a_safetensors_file_exits_before_building(tmp_path, synthetic):
    from tests.helpers import train

    hf = tmp_path / 'hf'
    _llava_hf(str(hf))
    result = train(tmp_path / 'run', synthetic, '--load-from', str(hf / 'model.safetensors'),
                   iters=1)
    assert result.returncode != 0
    assert 'safetensors file, not an mllm checkpoint' in result.stderr
    assert 'mllm convert hf-to-pth' in result.stderr


@pytest.mark.slow
def test_would_be_silent_random_starts_exit_non_zero(official, synthetic, tmp_path):
    from tests.helpers import train

    hf = tmp_path / 'llava_hf'
    _llava_hf(str(hf))
    cases = [
        # a llava-hf folder's weights file: refused before anything is built
        (['--load-from', str(hf / 'model.safetensors')], TINY, (),
         ['safetensors file, not an mllm checkpoint', 'convert hf-to-pth']),
        # LLaVA's stage-1 projector as it was released: every key foreign
        (['--load-from', official['projector']], TINY, (),
         ['4 of its 4 tensors match nothing', 'model.mm_projector.0.weight', 'convert hf-to-pth']),
        # a llava-hf folder as the CLIP tower's `pretrained`
        ([], TINY, (f'vision_encoder.pretrained={hf}',),
         ['is a whole LlavaForConditionalGeneration model, not a CLIP']),
    ]
    llava_run = str(tmp_path / 'iter_600.pth')
    _tiny_llava_run_checkpoint(llava_run)
    # a tiny LLaVA checkpoint into the tiny ConvLLaVA
    cases.append((['--load-from', llava_run], 'configs/tiny/tiny_convllava_synthetic.py',
                  ('image_processor.size=256',),
                  ['match nothing in the model', 'vision_encoder.model.embeddings']))
    for i, (extra, config, options, messages) in enumerate(cases):
        result = train(tmp_path / f'run{i}', synthetic, *extra, iters=1, config=config,
                       options=options)
        assert result.returncode != 0, (extra, options, result.stderr[-2000:])
        for message in messages:
            assert message in result.stderr, (message, result.stderr[-3000:])
        assert not (tmp_path / f'run{i}' / 'iter_1.pth').exists()


@pytest.mark.slow
def test_imported_llava_trains_and_partial_loads_need_the_opt_out(official, synthetic, tmp_path):
    from tests.helpers import train

    imported = str(tmp_path / 'llava15.pth')
    result = run_mllm('convert', 'hf-to-pth', TINY, official['no_tower'], imported,
                      '--cfg-options', f'vision_encoder.pretrained={official["clip"]}')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'vision_encoder from the config' in result.stdout
    clip = f'vision_encoder.pretrained={official["clip"]}'
    ok = train(tmp_path / 'from_import', synthetic, '--load-from', imported, iters=1,
               options=(clip,))
    assert ok.returncode == 0, ok.stderr[-3000:]
    # and out again: pth-to-hf takes the import (the tower frozen, as LLaVA-1.5 has it)
    export = run_mllm('convert', 'pth_to_hf', TINY, imported, str(tmp_path / 'export'),
                      '--cfg-options', clip, "model.trainable=['projector','llm']",
                      f'tokenizer.pretrained={synthetic["tokenizer"]}')
    assert export.returncode == 0, export.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'export' / 'mllm_config.json')
    # the same projector-only file as above, loaded on purpose
    partial = train(tmp_path / 'partial', synthetic, '--load-from', official['projector'],
                    iters=1, options=('load_from_strict=False',))
    assert partial.returncode == 0, partial.stderr[-3000:]
    log = partial.stderr + partial.stdout
    assert 'load_from_strict=False: loading the tensors that match' in log
