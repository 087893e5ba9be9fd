"""ConvLLaVA: the ConvNeXt encoder (three backends, stage 5, meta device, local weights),
keep-aspect preprocessing, the recipes' token table and per-stage trainable sets, and the
tiny three-stage pipeline through the real CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.cli import main
from mllm.engine.config import CONFIG_ROOT, load_config
from mllm.models.convnext import ConvNeXtEncoder

REPO = os.path.dirname(CONFIG_ROOT)
# REFERENCE.md §3: ConvNeXt-L trunk, ConvLLaVA stage 5, both, mlp2x_gelu 3072 -> 4096
TRUNK_M, STAGE5_M, VISION_M, PROJECTOR_M = 196.2, 472.9, 669.2, 29.4
VICUNA7B = 6_738_415_616  # REFERENCE.md §2 (exact count of the meta build)
STAGE5 = dict(channels=3072, depth=6)
# a tiny timm ConvNeXt (convnext_atto's block type, one block per stage)
TINY_TIMM = dict(backend='timm', model_name='convnext_atto',
                 model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)))
TINY_HF = dict(backend='hf', config=dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128]))


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_params(c_in: int, c_out: int, depth: int, downsample: bool = True) -> int:
    """ConvNeXt stage size from the architecture: downsample LayerNorm(c_in) + Conv k2
    (c_in -> c_out); per block dwconv 7x7, LayerNorm, Linear c -> 4c -> c, layer scale."""
    block = (49 * c_out + c_out) + 2 * c_out + (4 * c_out * c_out + 4 * c_out) + \
        (4 * c_out * c_out + c_out) + c_out
    return (2 * c_in + 4 * c_in * c_out + c_out if downsample else 0) + depth * block


def inspect_json(capsys, *args):
    capsys.readouterr()
    assert main(['inspect', *args, '--json']) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- encoder

@pytest.mark.parametrize('kwargs', [dict(backend='hf'),
                                    dict(backend='timm', model_name='convnext_large'),
                                    dict(backend='open_clip', model_name='convnext_large_d_320')],
                         ids=['hf', 'timm', 'open_clip'])
def test_convnext_large_plus_stage5_matches_reference_on_meta(kwargs):
    with torch.device('meta'):
        encoder = ConvNeXtEncoder(**kwargs, extra_stage=STAGE5)
    assert all(p.device.type == 'meta' for p in encoder.parameters())  # nothing allocated
    assert round(numel(encoder.stage5) / 1e6, 1) == STAGE5_M
    assert numel(encoder.stage5) == stage_params(1536, 3072, 6) == 472_934_400
    assert round((numel(encoder) - numel(encoder.stage5)) / 1e6, 1) == TRUNK_M
    assert round(numel(encoder) / 1e6, 1) == VISION_M
    assert encoder.stage_channels == [192, 384, 768, 1536, 3072]
    assert (encoder.stride, encoder.out_channels) == (64, 3072)
    for side, tokens in ((768, 144), (1024, 256), (1536, 576)):
        assert encoder.num_visual_tokens((side, side)) == tokens
    assert encoder.num_visual_tokens((1536, 768)) == 288
    names = {n.split('.')[0] + ('.' + n.split('.')[1] if n.startswith('stages') else '')
             for n, _ in encoder.named_parameters()}
    assert names == {'stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3', 'stage5'}


@pytest.mark.parametrize('kwargs', [TINY_TIMM, TINY_HF], ids=['timm', 'hf'])
def test_forward_returns_tokens_and_every_stage_map(kwargs):
    encoder = ConvNeXtEncoder(**kwargs, extra_stage=dict(channels=256, depth=1))
    tokens, maps = encoder(torch.randn(2, 3, 256, 192), return_stages=True)
    assert tokens.shape == (2, 4 * 3, 256)  # (256 / 64) x (192 / 64)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 64, 48), (32, 32, 24), (64, 16, 12),
                                                  (128, 8, 6), (256, 4, 3)]
    assert torch.equal(tokens, maps[-1].flatten(2).transpose(1, 2))
    assert [m.shape for m in encoder.forward_stages(torch.randn(1, 3, 64, 64))][-1] == (1, 256, 1, 1)
    # sides that are not stride multiples: ceil, as num_visual_tokens says
    assert encoder(torch.randn(1, 3, 100, 70)).shape[1] == encoder.num_visual_tokens((70, 100)) == 4
    encoder.set_grad_checkpointing(True)
    encoder.train()(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_loads_local_pretrained_weights(tmp_path):
    """HF: a save_pretrained folder; timm: a weights file (with a classifier, dropped)."""
    import timm
    from transformers import ConvNextConfig, ConvNextModel
    hf = ConvNextModel(ConvNextConfig(**TINY_HF['config']))
    hf.save_pretrained(tmp_path / 'hf')
    encoder = ConvNeXtEncoder(backend='hf', pretrained=str(tmp_path / 'hf'))
    assert torch.equal(encoder.stages[2].layers[0].pwconv1.weight,
                       hf.encoder.stages[2].layers[0].pwconv1.weight)
    timm_model = timm.create_model('convnext_atto', **TINY_TIMM['model_kwargs'])
    torch.save(timm_model.state_dict(), tmp_path / 'atto.pth')
    encoder = ConvNeXtEncoder(**TINY_TIMM, pretrained=str(tmp_path / 'atto.pth'))
    assert torch.equal(encoder.stages[3].blocks[0].conv_dw.weight,
                       timm_model.stages[3].blocks[0].conv_dw.weight)
    with pytest.raises(FileNotFoundError, match='Cannot load the ConvNeXt'):
        ConvNeXtEncoder(backend='hf', pretrained=str(tmp_path / 'missing'))


# ---------------------------------------------------------------- keep-aspect preprocessing

def test_keep_aspect_sizes_and_tokens():
    from PIL import Image

    from mllm.datasets.image_processing import LLaVAImageProcessor
    keep = LLaVAImageProcessor(size=1536, token_stride=64, keep_aspect=True)
    assert keep.output_size((3000, 1500)) == (1536, 768) and keep.num_visual_tokens((3000, 1500)) == 288
    assert keep.output_size((500, 2000)) == (384, 1536)  # 384 = 1536 / 4, a multiple of 64
    assert keep.output_size((5000, 10)) == (1536, 64)  # never below one token
    square = LLaVAImageProcessor(size=1536, token_stride=64)
    assert square.num_visual_tokens((3000, 1500)) == 576  # padded to square
    small = LLaVAImageProcessor(size=64, token_stride=16, keep_aspect=True)
    assert small(Image.new('RGB', (40, 20))).shape == (3, 32, 64)


def test_keep_aspect_batch_of_two_shapes_trains_without_padding_tokens(tiny_llava_files,
                                                                       tiny_tokenizer, tiny_model_cfg):
    from mllm.datasets.collate import llava_collate
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.datasets.llava import LLaVADataset
    from mllm.registry import MODELS
    processor = LLaVAImageProcessor(size=128, token_stride=32, keep_aspect=True)  # TINY_HF
    dataset = LLaVADataset(tiny_llava_files['json'], tiny_tokenizer, 'vicuna_v1', processor,
                           image_folder=tiny_llava_files['image_folder'])
    batch = llava_collate([dataset[1], dataset[3]])  # 40x20 and 20x40 images
    assert [tuple(p.shape) for p in batch['pixel_values']] == [(3, 64, 128), (3, 128, 64)]
    slots = (batch['input_ids'] == -200).sum(1).tolist()
    assert slots == [8, 8]  # (128/32) x (64/32) each; pad-to-square would spend 16
    tiny_model_cfg.update(vision_encoder=dict(TINY_HF, type='ConvNeXtEncoder'),
                          trainable=['vision_encoder', 'projector'])
    torch.manual_seed(0)
    model = MODELS.build(tiny_model_cfg)
    assert model.encode_images(batch['pixel_values']).shape[0] == sum(slots)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.vision_encoder.stem.patch_embeddings.weight.detach().clone()
    loss = model(**batch)['loss']
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.vision_encoder.stem.patch_embeddings.weight)


# ---------------------------------------------------------------- recipes

def test_inspect_token_table_and_trainable_params_per_stage(capsys):
    for side, tokens in ((768, 144), (1024, 256), (1536, 576)):
        report = inspect_json(capsys, f'convllava_vicuna7b_{side}_stage1')
        assert report['visual_tokens'] == tokens and report['image_size'] == [side, side]
    params = report['params']
    assert round(params['vision'] / 1e6, 1) == VISION_M and params['llm'] == VICUNA7B
    assert round(params['projector'] / 1e6, 1) == PROJECTOR_M
    projector, stage5 = params['projector'], stage_params(1536, 3072, 6)
    assert report['trainable_params'] == stage5 + projector
    stage2 = inspect_json(capsys, 'convllava_vicuna7b_1536_stage2')
    convnext_34 = stage_params(384, 768, 27) + stage_params(768, 1536, 3)  # stages.2, stages.3
    assert stage2['trainable_params'] == convnext_34 + stage5 + projector + VICUNA7B
    stage3 = inspect_json(capsys, 'convllava_vicuna7b_768_stage3')
    assert stage3['trainable_params'] == projector + VICUNA7B
    wide = inspect_json(capsys, 'convllava_vicuna7b_1536_stage3', '--image-size', '1536x768',
                        '--cfg-options', 'image_processor.keep_aspect=True')
    assert wide['visual_tokens'] == 288
    padded = inspect_json(capsys, 'convllava_vicuna7b_1536_stage3', '--image-size', '1536x768')
    assert padded['visual_tokens'] == 576


def test_recipes_carry_seed_hyperparameters_and_deepspeed():
    seed = {1: (3e-4, 256, 'zero2'), 2: (2e-5, 256, 'zero3'), 3: (2e-5, 128, 'zero2')}
    for side in (768, 1024, 1536):
        for stage, (lr, batch, zero) in seed.items():
            cfg = load_config(f'convllava_vicuna7b_{side}_stage{stage}')
            assert cfg.optim_wrapper.optimizer.lr == lr
            assert cfg.optim_wrapper.optimizer.weight_decay == 0.0
            assert 8 * cfg.train_dataloader.batch_size * cfg.optim_wrapper.get(
                'accumulative_counts', 1) == batch  # on 8 GPUs
            assert cfg.deepspeed == zero and cfg.train_cfg.max_epochs == 1
            assert cfg.image_processor.size == side and cfg.image_processor.token_stride == 64
    for llm in ('phi3_mini', 'vicuna13b', 'llama3_8b', 'yi34b'):
        cfg = load_config(f'convllava_{llm}_1536_stage3')
        assert cfg.model.vision_encoder.extra_stage.channels == 3072
        assert cfg.model.llm.pretrained != load_config('convllava_vicuna7b_1536_stage3').llm.pretrained


def test_train_uses_the_recipe_deepspeed_unless_overridden(monkeypatch):
    import mllm.engine.runner as runner_module
    seen = []

    class FakeRunner:
        def train(self):
            pass

    def fake_build_runner(cfg, **kwargs):
        seen.append(kwargs['deepspeed'])
        return FakeRunner()

    monkeypatch.setattr(runner_module, 'build_runner', fake_build_runner)
    assert main(['train', 'convllava_vicuna7b_768_stage1']) == 0
    assert main(['train', 'convllava_vicuna7b_768_stage2', '--load-from', 'x.pth']) == 0
    assert main(['train', 'convllava_vicuna7b_768_stage1', '--deepspeed', 'zero2_fp32']) == 0
    assert main(['train', 'convllava_vicuna7b_768_stage1', '--deepspeed', 'none']) == 0
    assert main(['train', 'configs/tiny/tiny_llava_synthetic.py']) == 0
    assert seen == ['zero2', 'zero3', 'zero2_fp32', None, None]


# ---------------------------------------------------------------- three stages in a row

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=64,
                                  num_val=8)


def train_stage(stage, work_dir, synthetic, load_from=None, iters=2):
    options = [f'train_cfg.max_iters={iters}', 'default_hooks.logger.interval=1',
               f'default_hooks.checkpoint.interval={iters}', 'train_dataloader.batch_size=4',
               f'train_dataloader.dataset.data_path={synthetic["train"]}',
               f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}',
               f'tokenizer.pretrained={synthetic["tokenizer"]}']
    cmd = [sys.executable, '-m', 'mllm', 'train',
           f'configs/tiny/tiny_convllava_synthetic_stage{stage}.py', '--work-dir', str(work_dir)]
    cmd += ['--load-from', str(load_from)] if load_from else []
    result = subprocess.run([*cmd, '--cfg-options', *options], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work_dir / f'iter_{iters}.pth', weights_only=True)['state_dict']


def model_after_load_from(stage, checkpoint, synthetic, work_dir):
    """The stage's model as the runner holds it after `load_from`, before its first step."""
    from mllm.engine.runner import build_runner
    cfg = load_config(f'configs/tiny/tiny_convllava_synthetic_stage{stage}.py',
                      {'tokenizer.pretrained': synthetic['tokenizer']})
    runner = build_runner(cfg, work_dir=str(work_dir), load_from=str(checkpoint))
    runner.load_or_resume()
    return runner.model


def prefixes(state):
    return {'.'.join(k.split('.')[:3 if k.startswith('vision_encoder.stages') else 2])
            for k in state}


def test_tiny_convllava_three_stages_hand_over_checkpoints(tmp_path, synthetic):
    state1 = train_stage(1, tmp_path / 's1', synthetic)
    assert prefixes(state1) == {'vision_encoder.stage5', 'projector.linear_1', 'projector.linear_2'}
    state2 = train_stage(2, tmp_path / 's2', synthetic, tmp_path / 's1' / 'iter_2.pth')
    assert {p for p in prefixes(state2) if not p.startswith('llm')} == {
        'vision_encoder.stages.2', 'vision_encoder.stages.3', 'vision_encoder.stage5',
        'projector.linear_1', 'projector.linear_2'}
    state3 = train_stage(3, tmp_path / 's3', synthetic, tmp_path / 's2' / 'iter_2.pth')
    # stage 3 freezes the vision stages stage 2 trained, and still carries them on unchanged:
    # the last checkpoint alone is complete on top of the pretrained towers
    assert {p for p in prefixes(state3) if not p.startswith('llm')} == {
        'vision_encoder.stages.2', 'vision_encoder.stages.3', 'vision_encoder.stage5',
        'projector.linear_1', 'projector.linear_2'}
    assert all(torch.equal(state3[k], v) for k, v in state2.items()
               if k.startswith('vision_encoder'))

    # stage k starts exactly where stage k-1 ended, for everything stage k-1 saved
    for stage, previous in ((2, state1), (3, state2)):
        start = model_after_load_from(stage, tmp_path / f's{stage - 1}' / 'iter_2.pth',
                                      synthetic, tmp_path / f'load{stage}').state_dict()
        assert all(torch.equal(start[k], v) for k, v in previous.items())
    # and training moved what it trains
    assert not torch.equal(state1['projector.linear_1.weight'], state2['projector.linear_1.weight'])
    assert not torch.equal(state2['llm.lm_head.weight'], state3['llm.lm_head.weight'])
