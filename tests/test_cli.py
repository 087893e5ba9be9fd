"""The `mllm` command end to end: configs, inspect, check-data, train (exit codes, losses,
checkpoints, resume, stage hand-over, 2 processes) on the tiny config and synthetic data."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.cli import main
from mllm.engine.config import CONFIG_ROOT, load_config
from helpers import losses, swap_config

REPO = os.path.dirname(CONFIG_ROOT)
TINY = 'configs/tiny/tiny_llava_synthetic.py'

# REFERENCE.md §2: published LLM sizes (billions)
LLM_PARAMS = {'phi3_mini': 3.821, 'vicuna7b': 6.738, 'vicuna13b': 13.016, 'llama3_8b': 8.030,
              'yi34b': 34.389}


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=256,
                                  num_val=32)


def data_options(synthetic):
    return [f'train_dataloader.dataset.data_path={synthetic["train"]}',
            f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}',
            f'tokenizer.pretrained={synthetic["tokenizer"]}']


def mllm(*args, env=None, timeout=600):
    """Run the real console entry point in a subprocess (exit codes, torchrun)."""
    return subprocess.run([sys.executable, '-m', 'mllm', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def train(work_dir, synthetic, *extra, iters=6, options=(), env=None):
    return mllm('train', TINY, '--work-dir', str(work_dir), *extra, '--cfg-options',
                f'train_cfg.max_iters={iters}', 'default_hooks.logger.interval=1',
                f'default_hooks.checkpoint.interval={iters}', *data_options(synthetic),
                *options, env=env)






def inspect_json(capsys, *args):
    capsys.readouterr()  # drop earlier output
    assert main(['inspect', *args, '--json']) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- configs and inspect

def test_list_and_copy_cfg(tmp_path, capsys):
    assert main(['list-cfg']) == 0
    names = capsys.readouterr().out.split()
    for name in ('llava15_vicuna7b_pretrain', 'llava15_vicuna13b_finetune',
                 'llava15_vicuna7b_finetune_lora', 'llava_med_vicuna7b_stage1',
                 'llava_med_vicuna7b_stage2', 'tiny_llava_synthetic'):
        assert name in names
    assert main(['list-cfg', '-p', 'LORA']) == 0
    assert all('lora' in n for n in capsys.readouterr().out.split())
    assert main(['list-cfg', '-p', 'no-such-recipe']) == 1

    dest = tmp_path / 'mine.py'
    assert main(['copy-cfg', 'llava15_vicuna7b_finetune', str(dest)]) == 0
    copied = inspect_json(capsys, str(dest))
    assert copied == inspect_json(capsys, 'llava15_vicuna7b_finetune')
    assert main(['copy-cfg', 'llava15_vicuna7b_finetune', str(dest)]) == 1  # no overwrite


@pytest.mark.parametrize('llm', sorted(LLM_PARAMS))
def test_inspect_reports_published_llm_size_for_each_backbone_swap(llm, tmp_path, capsys):
    report = inspect_json(capsys, swap_config(tmp_path, 'llava15_finetune', llm))
    params = report['params']
    assert abs(params['llm'] / 1e9 - LLM_PARAMS[llm]) / LLM_PARAMS[llm] < 0.005
    assert abs(params['vision'] / 1e6 - 303.5) < 0.1  # CLIP ViT-L/14-336 tower
    assert params['total'] == params['llm'] + params['vision'] + params['projector']
    assert report['trainable_params'] == params['llm'] + params['projector']
    assert report['visual_tokens'] == 576 and report['image_size'] == [336, 336]


def test_inspect_trainable_params_follow_the_stage(capsys):
    pretrain = inspect_json(capsys, 'llava15_vicuna7b_pretrain')
    # mlp2x_gelu 1024 -> 4096: 1024*4096 + 4096 + 4096*4096 + 4096
    assert pretrain['params']['projector'] == 20_979_712
    assert pretrain['trainable_params'] == 20_979_712
    lora = inspect_json(capsys, 'llava15_vicuna7b_finetune_lora')
    assert lora['params']['llm'] == pretrain['params']['llm']  # adapters counted apart
    # r=128 on q,k,v,o,gate,up,down of 32 layers: r * (in + out) per linear
    per_layer = 128 * ((4096 + 4096) * 4 + (4096 + 11008) * 2 + (11008 + 4096))
    assert lora['params']['lora'] == 32 * per_layer
    assert lora['trainable_params'] == lora['params']['lora'] + lora['params']['projector']
    med = inspect_json(capsys, 'llava_med_vicuna7b_stage1')
    assert med['trainable_params'] == 20_979_712


def test_inspect_image_size_and_text_output(capsys):
    report = inspect_json(capsys, TINY, '--image-size', '200x100')
    assert report['image_size'] == [200, 100] and report['visual_tokens'] == 64  # padded to 64²
    assert main(['inspect', 'llava15_vicuna13b_pretrain']) == 0
    text = capsys.readouterr().out
    assert '13,015,864,320' in text and 'visual tokens for a 336x336 image: 576' in text
    assert main(['inspect', TINY, '--image-size', '12by3']) == 2  # argparse rejects it


def test_overrides_bind_late_and_unknown_keys_are_rejected(capsys):
    cfg = load_config('llava15_vicuna7b_finetune', {'llm.pretrained': '/local/vicuna'})
    assert cfg.model.llm.pretrained == '/local/vicuna'  # bound after the override
    assert cfg.train_dataloader.dataset.template == 'vicuna_v1'
    assert cfg.train_dataloader.sampler.per_device_batch_size == 16
    pretrain = load_config('llava15_vicuna7b_pretrain')
    assert pretrain.train_dataloader.dataset.template == 'plain'  # the dataset's own wins
    assert load_config('llava_med_vicuna7b_stage1').train_dataloader.dataset.template == 'vicuna_v1'
    with pytest.raises(KeyError, match='trian_cfg'):
        load_config(TINY, {'trian_cfg.max_iters': 3})
    assert main(['print-config', TINY, '--cfg-options', 'nope.x=1']) == 1
    assert "no top-level key 'nope'" in capsys.readouterr().err


def test_partial_override_at_the_bound_place_merges_into_the_component():
    # `model.vision_encoder.x=...` must not replace the bound encoder by {x: ...} (a KeyError on 'type')
    conv = 'configs/tiny/tiny_convllava_synthetic.py'
    cfg = load_config(conv, {'model.vision_encoder.model_kwargs.ls_init_value': 1.0,
                             'train_dataloader.dataset.image_processor.size': 128})
    encoder = cfg.model.vision_encoder
    assert encoder.type == 'ConvNeXtEncoder' and encoder.model_kwargs.ls_init_value == 1.0
    assert tuple(encoder.model_kwargs.dims) == (16, 32, 64, 128)
    processor = cfg.train_dataloader.dataset.image_processor
    assert processor.size == 128 and processor.token_stride == 32
    assert 'ls_init_value' not in cfg.vision_encoder.model_kwargs  # the top-level key is untouched
    # a complete component at the target still wins
    cfg = load_config(conv, {'model.vision_encoder': dict(type='CLIPVisionEncoder')})
    assert cfg.model.vision_encoder == dict(type='CLIPVisionEncoder')


def test_registry_builds_by_name_in_the_mllm_scope():
    from mmengine.registry import MODELS as ROOT_MODELS, DefaultScope

    from mllm.models.projectors import MLPProjector
    with DefaultScope.overwrite_default_scope('mllm'):
        projector = ROOT_MODELS.build(dict(type='MLPProjector', in_channels=4, out_channels=8))
    assert isinstance(projector, MLPProjector)
    with pytest.raises(KeyError):
        from mllm.registry import MODELS
        MODELS.build(dict(type='NoSuchModel'))


# ---------------------------------------------------------------- check-data

def write_bad_dataset(root, synthetic):
    with open(synthetic['train']) as f:
        good = json.load(f)[:3]
    bad = [
        good[0],
        dict(good[1], image='train/missing.png'),
        dict(good[2], conversations=[{'from': 'human', 'value': 'no placeholder'},
                                     {'from': 'gpt', 'value': 'red'}]),
        dict(good[0], id='long', conversations=[good[0]['conversations'][0],
                                                {'from': 'gpt', 'value': 'red ' * 400}]),
        dict(good[0], id='corrupt', image='corrupt.png'),
    ]
    # a linked-in dataset folder, as users lay them out
    (root / 'images').mkdir()
    os.symlink(os.path.join(synthetic['image_folder'], 'train'), root / 'images' / 'train')
    (root / 'images' / 'corrupt.png').write_bytes(b'not a png')
    path = root / 'bad.json'
    path.write_text(json.dumps(bad))
    return str(path), str(root / 'images')


def test_check_data_reports_every_problem_with_its_sample(tmp_path, synthetic, capsys):
    data, images = write_bad_dataset(tmp_path, synthetic)
    opts = ['--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}']
    assert main(['check-data', TINY, '--data', data, '--image-folder', images, *opts]) == 1
    err = capsys.readouterr().err
    assert f'{data}: index 1' in err and 'image not found' in err
    assert 'index 2' in err and 'no image' not in err.split('index 2')[0]
    assert 'has an image but 0 <image> placeholders' in err
    assert 'index 3 (id long)' in err and 'exceed max_length 256' in err
    assert 'index 4 (id corrupt)' in err and 'cannot decode' in err
    assert 'index 0' not in err


def test_check_data_show_prints_training_encoding(synthetic, capsys):
    from mllm.registry import DATASETS
    opts = ['--cfg-options', *data_options(synthetic)]
    assert main(['check-data', TINY, '--show', '2', '--json', *opts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == dict(file=synthetic['train'], samples=256, problems=0)
    cfg = load_config(TINY, dict(arg.split('=', 1) for arg in opts[1:]))
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    for record in lines[:2]:
        item = dataset[record['index']]
        assert record['input_ids'] == item['input_ids'].tolist()
        assert record['labels'] == item['labels'].tolist()
        assert record['input_ids'].count(-200) == 64
        assert -100 in record['labels'] and any(v >= 0 for v in record['labels'])


def test_check_data_bad_json_line(tmp_path, synthetic, capsys):
    path = tmp_path / 'broken.jsonl'
    path.write_text('{"id": 1, "conversations": []}\n{not json\n')
    opts = ['--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}']
    assert main(['check-data', TINY, '--data', str(path), *opts]) == 1
    assert f'{path}: line 2: invalid JSON' in capsys.readouterr().err


# ---------------------------------------------------------------- train

def test_train_loss_falls_and_writes_mmengine_outputs(tmp_path, synthetic):
    result = train(tmp_path, synthetic, iters=30)
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(tmp_path)
    assert len(values) == 30  # one scalar per iteration
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1.0
    assert os.path.isfile(tmp_path / 'iter_30.pth')
    assert 'checkpoint keeps' in result.stdout + result.stderr


def test_resume_auto_is_bit_exact(tmp_path, synthetic):
    """With dropout on, so the curve matches only if the RNG states come back too."""
    full, split = tmp_path / 'full', tmp_path / 'split'
    dropout = ['llm.config.attention_dropout=0.1']
    assert train(full, synthetic, iters=8, options=dropout).returncode == 0
    first = train(split, synthetic, iters=4, options=['train_cfg.max_iters=4', *dropout])
    assert first.returncode == 0
    resumed = train(split, synthetic, '--resume', 'auto', iters=8, options=dropout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '--resume auto: resuming from' in resumed.stdout + resumed.stderr
    assert 'resumed the RNG states of the checkpoint' in resumed.stdout + resumed.stderr
    assert losses(split) == losses(full)  # bit-identical curve
    a = torch.load(full / 'iter_8.pth', weights_only=True)['state_dict']
    b = torch.load(split / 'iter_8.pth', weights_only=True)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_handover_with_load_from(tmp_path, synthetic):
    """Stage 1 trains the projector only and saves only it; stage 2 starts from it and,
    though it trains only the LLM, its checkpoint carries the stage-1 projector on."""
    stage1 = train(tmp_path / 's1', synthetic, iters=3, options=["model.trainable=['projector']"])
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    state1 = torch.load(tmp_path / 's1' / 'iter_3.pth', weights_only=True)['state_dict']
    assert state1 and all(k.startswith('projector.') for k in state1)

    # stage 2 freezes the projector: its checkpoint still carries what it started from
    stage2 = train(tmp_path / 's2', synthetic, '--load-from', str(tmp_path / 's1' / 'iter_3.pth'),
                   iters=1, options=["model.trainable=['llm']"])
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    state2 = torch.load(tmp_path / 's2' / 'iter_1.pth', weights_only=True)['state_dict']
    assert {k for k in state2 if k.startswith('projector.')} == set(state1)
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert any(k.startswith('llm.') for k in state2)
    assert not any(k.startswith('vision_encoder.') for k in state2)  # frozen, never loaded


@pytest.mark.parametrize('case', ['missing_config', 'bad_data', 'crash_mid_training',
                                  'llava_med_without_checkpoint'])
def test_train_failures_exit_non_zero_with_the_error(case, tmp_path, synthetic):
    if case == 'missing_config':
        result = mllm('train', 'configs/no/such.py')
        assert result.returncode != 0 and 'config not found' in result.stderr
    elif case == 'bad_data':
        path = tmp_path / 'bad.jsonl'
        path.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n[oops\n')
        result = train(tmp_path, synthetic, options=[f'train_dataloader.dataset.data_path={path}'])
        assert result.returncode != 0 and f'{path}: line 2: invalid JSON' in result.stderr
    elif case == 'crash_mid_training':
        with open(synthetic['train']) as f:
            samples = json.load(f)[:64]
        samples[40]['image'] = 'train/deleted.png'  # found only when the sample is read
        path = tmp_path / 'late.json'
        path.write_text(json.dumps(samples))
        result = train(tmp_path, synthetic, iters=20, options=[
            f'train_dataloader.dataset.data_path={path}', 'train_dataloader.batch_size=4',
            'train_dataloader.sampler.shuffle=False'])
        assert result.returncode != 0
        assert 'index 40 (id train_000040): image not found' in result.stderr
    else:
        result = mllm('train', 'llava_med_vicuna7b_stage1')
        assert result.returncode != 0 and 'pass --load-from' in result.stderr


def test_two_processes_with_gloo(tmp_path, synthetic):
    """NPROC_PER_NODE=2 launches torchrun; 2 x 16 samples match one process of 32."""
    result = train(tmp_path, synthetic, iters=3, options=['train_dataloader.batch_size=16'],
                   env={'NPROC_PER_NODE': '2'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'iter_3.pth')
    values = losses(tmp_path)
    assert len(values) == 3 and all(v == v and v < 10 for v in values)


def test_deepspeed_config_resolution(tmp_path):
    from mllm.engine.runner import use_deepspeed
    cfg = load_config(TINY, {'optim_wrapper.accumulative_counts': 2})
    use_deepspeed(cfg, 'zero3')
    ds = cfg.strategy.config
    assert ds['zero_optimization']['stage'] == 3
    assert (ds['train_micro_batch_size_per_gpu'], ds['gradient_accumulation_steps'],
            ds['gradient_clipping']) == (32, 2, 1.0)
    assert cfg.runner_type == 'FlexibleRunner'
    with pytest.raises(FileNotFoundError, match='shipped'):
        use_deepspeed(load_config(TINY), 'zero9')


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path, synthetic):
    result = train(tmp_path, synthetic, '--deepspeed', 'zero2_fp32', iters=3,
                   options=['train_dataloader.batch_size=16'], env={'NPROC_PER_NODE': '2'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path)) == 3


def test_mini_demo_pipeline(tmp_path):
    """The demo end to end at toy size: data, two trainings, evaluation, results.json."""
    result = mllm('demo', '--work-dir', str(tmp_path / 'demo'), '--data-dir',
                  str(tmp_path / 'data'), '--num-train', '128', '--num-val', '40',
                  '--max-iters', '4')
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'demo' / 'results.json') as f:
        results = json.load(f)
    assert set(results['models']) == {'tiny_llava', 'blind'}
    for r in results['models'].values():
        assert 0 <= r['accuracy'] <= 1 and set(r['per_category']) == {
            'colour', 'shape', 'position', 'count', 'fine_detail'}
    with open(tmp_path / 'demo' / 'tiny_llava' / 'predictions.jsonl') as f:
        assert len(f.readlines()) == 40
    assert 'margin over the blind baseline' in result.stdout
    assert '[demo] tiny_llava: step 4/4  loss ' in result.stdout  # training progress is shown


@pytest.mark.slow
def test_full_demo_beats_blind_baseline_by_30_points(tmp_path):
    result = mllm('demo', '--work-dir', str(tmp_path / 'demo'), '--data-dir',
                  str(tmp_path / 'data'), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'demo' / 'results.json') as f:
        assert json.load(f)['margin_points'] >= 30


def test_tensorboard_backend_logs_the_same_losses(tmp_path, synthetic):
    """`log_backends=['tensorboard']` writes event files holding the losses of scalars.json."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tmp_path, synthetic, iters=2, options=["log_backends=['tensorboard']"])
    assert result.returncode == 0, result.stderr[-3000:]
    events = glob.glob(str(tmp_path / '*' / 'vis_data' / 'events.out.tfevents.*'))
    assert len(events) == 1
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    logged = [e.value for e in accumulator.Scalars('loss')]
    assert logged == pytest.approx(losses(tmp_path), rel=1e-6) and len(logged) == 2


def test_log_backends_errors():
    with pytest.raises(ValueError, match=r"unknown \['mlflow'\]"):
        load_config(TINY, {'log_backends': ['mlflow']})
    cfg = load_config(TINY, {'log_backends': ['tensorboard']})
    assert [b['type'] for b in cfg.visualizer.vis_backends] == ['LocalVisBackend',
                                                                'TensorboardVisBackend']
    assert load_config(TINY).visualizer.vis_backends == [dict(type='LocalVisBackend')]
    import importlib.util
    if importlib.util.find_spec('wandb') is None:
        with pytest.raises(ImportError, match='pip install wandb'):
            load_config(TINY, {'log_backends': ['wandb']})


def test_demo_max_iters_stretches_the_schedule():
    """--max-iters moves the cosine's end with the last step; the warm-up stays."""
    from mllm.cli.demo import DEMO_MODELS, schedule_options
    options = schedule_options(DEMO_MODELS['tiny_llava'][0], 1500)
    assert options == ['train_cfg.max_iters=1500', 'param_scheduler.1.end=1500']
    cfg = load_config(TINY, {k: int(v) for k, v in (o.split('=') for o in options)})
    assert cfg.param_scheduler[0].end == 50 and cfg.param_scheduler[1].end == 1500
    # shorter than the warm-up (smoke runs): the cosine never starts, so it is not moved
    assert schedule_options(DEMO_MODELS['tiny_llava'][0], 4) == ['train_cfg.max_iters=4']


def _demo_per_category(tmp_path, models: str, timeout: int) -> dict:
    """Run ``mllm demo --models MODELS`` in tmp_path; per-category accuracy of each model."""
    result = mllm('demo', '--work-dir', str(tmp_path / 'demo'), '--data-dir',
                  str(tmp_path / 'data'), '--models', models, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'demo' / 'results.json') as f:
        return {k: v['per_category'] for k, v in json.load(f)['models'].items()}


@pytest.mark.slow
def test_tiny_mgllava_reads_the_fine_detail_the_tiny_llava_cannot(tmp_path):
    """Issue 5's demo target: on 100 held-out fine-detail questions the tiny MG-LLaVA (box
    token over the 256-px patch) beats the 64-px tiny LLaVA, which sits at chance; it is also
    ahead on the object questions. About 13 minutes on 2 cores."""
    models = _demo_per_category(tmp_path, 'tiny_mgllava,tiny_llava', timeout=3600)
    mg, llava = models['tiny_mgllava'], models['tiny_llava']
    assert llava['fine_detail'] <= 0.35  # blind to the pattern by construction
    assert mg['fine_detail'] >= llava['fine_detail'] + 0.3
    for category in ('shape', 'count', 'position'):
        assert mg[category] >= llava[category]


@pytest.mark.slow
def test_tiny_convllava_reads_the_fine_detail_the_tiny_llava_cannot(tmp_path):
    """Issue 4's demo target: at the same 64 visual tokens, the tiny ConvLLaVA (256-px
    ConvNeXt, stride 32) reads the fine-detail patch that the 64-px tiny LLaVA cannot (at
    chance by construction). Each trains its config's schedule; about 25 minutes on 2
    cores."""
    models = _demo_per_category(tmp_path, 'tiny_convllava,tiny_llava', timeout=5400)
    conv, llava = models['tiny_convllava'], models['tiny_llava']
    assert llava['fine_detail'] <= 0.35  # blind to the pattern by construction
    assert conv['fine_detail'] >= llava['fine_detail'] + 0.3
