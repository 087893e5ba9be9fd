"""DeepSpeed ZeRO-1/2/3 with 2 processes on CPU (gloo): precision resolution, the ZeRO-3
all-gather patch, text-only ranks, SIGKILL-and-resume bit-exactness, losses against a
single-process run, non-finite steps (issue 7)."""
import json
import math
import os
import types

import pytest
import torch

from helpers import NAN_MODEL, losses
from test_reliability import TINY, train

TWO = {'NPROC_PER_NODE': '2'}
# 48 samples: one process of batch 12, or 2 processes of 6, gives 4 iterations per epoch
PER_RANK = ['train_dataloader.batch_size=6']


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=48,
                                  num_val=8)


def config_with_module(tmp_path, name, source, extra=''):
    """A config on top of the tiny one that imports ``source`` (as module ``name``) in every
    process; returns (config path, env with its folder on PYTHONPATH)."""
    (tmp_path / f'{name}.py').write_text(source)
    path = tmp_path / f'{name}_config.py'
    path.write_text(f"_base_ = ['{TINY}']\ncustom_imports = dict(imports=['{name}'])\n{extra}")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))
    return str(path), {**TWO, 'PYTHONPATH': pythonpath}


# ---------------------------------------------------------------- configuration

def test_precision_auto_and_fp16_resolve_per_device(monkeypatch):
    from mllm.engine.runner import resolve_precision
    xtuner_style = lambda: {'fp16': {'enabled': 'auto'}, 'bf16': {'enabled': 'auto'}}  # noqa
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    ds = xtuner_style()
    assert resolve_precision(ds, 'x.json') == 'fp32'
    assert ds == {'fp16': {'enabled': False}, 'bf16': {'enabled': False}}
    assert resolve_precision({'fp16': {'enabled': True}}, 'x.json') == 'fp32'  # not on CPU
    assert resolve_precision({'bf16': {'enabled': True}}, 'x.json') == 'bf16'  # CPU does bf16
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for bf16_ok, expected in ((True, 'bf16'), (False, 'fp16')):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: bf16_ok)
        ds = xtuner_style()
        assert resolve_precision(ds, 'x.json') == expected
        assert ds[expected]['enabled'] is True and sum(s['enabled'] for s in ds.values()) == 1


@pytest.mark.parametrize('name', ['zero1', 'zero2', 'zero3', 'zero3_offload', 'zero1_fp32',
                                  'zero2_fp32', 'zero3_fp32', 'zero3_offload_fp32'])
def test_every_shipped_deepspeed_config_resolves(name):
    from mllm.engine.config import load_config
    from mllm.engine.runner import use_deepspeed
    cfg = load_config(TINY)
    use_deepspeed(cfg, name)
    ds = cfg.strategy.config
    assert 'auto' not in json.dumps(ds)
    assert ds['bf16']['enabled'] is (not name.endswith('_fp32'))
    assert ds['zero_optimization']['stage'] == int(name[4])
    assert ds['zero_optimization'].get('offload_param', {}).get('device') == (
        'cpu' if 'offload' in name else None)


# ---------------------------------------------------------------- ZeRO-3 all-gathers

def test_deepspeed_waits_on_every_zero3_all_gather_itself():
    """deepspeed < 0.19.8 waited on the last of ZeRO-3's per-parameter all-gathers only
    (nondeterministic / NaN with gloo); mllm patched that (``zero3_wait_all_gathers``) until
    deepspeedai/DeepSpeed#8539 fixed it in 0.19.8. The pinned release must carry the fix."""
    import inspect

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import Init
    from packaging.version import Version

    assert Version(deepspeed.__version__) >= Version('0.19.8')
    source = inspect.getsource(Init._allgather_params_coalesced)
    assert 'for handle in launch_handles:' in source and 'handle.wait()' in source


# ---------------------------------------------------------------- text-only ranks

def test_text_only_batch_runs_the_vision_tower_on_a_dummy_when_distributed(
        tiny_model_cfg, monkeypatch):
    from mllm.models import llava
    from mllm.registry import MODELS
    tiny_model_cfg['trainable'] = ['vision_encoder', 'projector', 'llm']
    model = MODELS.build(tiny_model_cfg)
    calls = []
    model.vision_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    input_ids = torch.tensor([[1, 5, 6, 7, 2]])
    plain = model.llm.get_input_embeddings()(input_ids)
    model.train()
    assert torch.equal(model.embed_inputs(input_ids), plain) and calls == []  # one process

    monkeypatch.setattr(llava.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(llava.dist, 'get_world_size', lambda: 2)
    embeds = model.embed_inputs(input_ids)
    assert calls == [(1, 3, 32, 32)]  # one blank image at the encoder's native size
    assert torch.equal(embeds, plain)  # added with weight 0
    embeds.sum().backward()
    grads = [p.grad for p in model.vision_encoder.parameters() if p.requires_grad]
    grads += [p.grad for p in model.projector.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)  # reduced, all zero
    model.eval()
    model.embed_inputs(input_ids)
    assert len(calls) == 1  # inference never pays for it


@pytest.mark.slow
def test_zero3_rank_without_images_does_not_hang(tmp_path, synthetic):
    """Rank 1 gets only text samples (every odd one, no shuffle). Every parameter is
    gathered on use (persistence threshold 0), so without the dummy vision pass the ranks'
    all-gathers no longer pair up (measured: the run dies in gloo; on NCCL it hangs)."""
    with open(synthetic['train']) as f:
        samples = json.load(f)
    for sample in samples[1::2]:
        del sample['image']
        sample['conversations'][0]['value'] = sample['conversations'][0]['value'].replace(
            '<image>\n', '')
    data = tmp_path / 'mixed.json'
    data.write_text(json.dumps(samples))
    with open(os.path.join(os.path.dirname(TINY), '..', '_base_', 'deepspeed',
                           'zero3_fp32.json')) as f:
        ds = json.load(f)
    ds['zero_optimization']['stage3_param_persistence_threshold'] = 0
    (tmp_path / 'zero3_gather.json').write_text(json.dumps(ds))
    result = train(tmp_path / 'w', synthetic, '--deepspeed', str(tmp_path / 'zero3_gather.json'),
                   iters=3, env=TWO, options=[
                       'train_dataloader.batch_size=2', f'train_dataloader.dataset.data_path={data}',
                       'train_dataloader.sampler.shuffle=False'])
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(tmp_path / 'w')
    assert len(values) == 3 and all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- kill and resume

KILL_DURING_SAVE = '''
import os
import signal

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

save = TorchCheckpointEngine.save


def dying_save(self, state_dict, path):
    """Rank 0 dies (SIGKILL) halfway through writing its optimizer shard of iter_4."""
    if '.iter_4.pth.partial' in path and 'optim_states' in path and os.environ['RANK'] == '0':
        with open(path, 'wb') as f:
            f.write(b'half a checkpoint')
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, state_dict, path)


TorchCheckpointEngine.save = dying_save
'''


def optimizer_shards(work_dir, tag):
    from mllm.engine.checkpoint import load_checkpoint_file
    """Every rank's ZeRO optimizer state (fp32 master weights and AdamW moments) as
    name -> tensor."""
    tensors = {}
    for path in sorted((work_dir / tag).glob('*optim_states.pt')):
        state = load_checkpoint_file(str(path))['optimizer_state_dict']  # the safe loader

        def walk(prefix, value):
            if isinstance(value, torch.Tensor):
                tensors[prefix] = value
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f'{prefix}.{k}', v)
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(f'{prefix}.{i}', v)
        walk(path.name, state)
    return tensors


def kill_during_save_then_resume(tmp_path, synthetic, stage):
    """2 processes, 4 iterations, checkpoints every 2; rank 0 is SIGKILLed halfway through
    writing its optimizer shard of iter_4, then `--resume auto`. Returns the work dir and
    the losses of the killed run (iterations 1-4) and of the resumed one (3-4)."""
    split = tmp_path / 'split'
    config, env = config_with_module(tmp_path, 'ds_killer', KILL_DURING_SAVE)
    killed = train(split, synthetic, '--deepspeed', stage, iters=4, config=config, env=env,
                   options=PER_RANK)
    assert killed.returncode != 0 and 'SIGKILL' in killed.stderr
    assert 'RankMeanLossHook' in killed.stdout + killed.stderr
    assert (split / 'last_checkpoint').read_text() == 'iter_2.pth'  # relative: the dir may move
    assert (split / '.iter_4.pth.partial').is_dir() and not (split / 'iter_4.pth').exists()
    killed_losses = losses(split)
    assert len(killed_losses) == 4 and all(math.isfinite(v) for v in killed_losses)

    resumed = train(split, synthetic, '--deepspeed', stage, '--resume', 'auto', iters=4,
                    env=TWO, options=PER_RANK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f'Resume checkpoint from {split / "iter_2.pth"}' in log
    assert 'data position set to iter 2 (epoch 0, batch 2 of 4)' in log
    assert not (split / '.iter_4.pth.partial').exists() and (split / 'iter_4.pth').is_dir()
    return split, killed_losses, losses(split)[4:]


def test_zero3_sigkill_during_save_then_resume_auto_continues_the_curve(tmp_path, synthetic):
    """`--resume auto` takes the last complete checkpoint (iter_2, not the half-written
    iter_4), seeks the data, and iterations 3-4 reproduce the killed run's bit for bit."""
    _, killed, resumed = kill_during_save_then_resume(tmp_path, synthetic, 'zero3_fp32')
    assert resumed == killed[2:]


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['zero1_fp32', 'zero2_fp32', 'zero3_fp32', 'zero3'])
def test_zero_kill_and_resume_equals_an_uninterrupted_run(stage, tmp_path, synthetic):
    """Against a separate uninterrupted run: the same losses (so two runs of the same config
    are identical; ZeRO-3 on gloo is deterministic with the patch) and, after the last
    step, the same optimizer shards (fp32 master weights, Adam moments) bit for bit."""
    full = tmp_path / 'full'
    result = train(full, synthetic, '--deepspeed', stage, iters=4, env=TWO, options=PER_RANK)
    assert result.returncode == 0, result.stderr[-3000:]
    split, killed, resumed = kill_during_save_then_resume(tmp_path, synthetic, stage)
    assert killed + resumed == losses(full) + losses(full)[2:]
    a, b = optimizer_shards(full, 'iter_4.pth'), optimizer_shards(split, 'iter_4.pth')
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- against one process

@pytest.fixture(scope='module')
def single_process_losses(tmp_path_factory, synthetic):
    work_dir = tmp_path_factory.mktemp('single')
    result = train(work_dir, synthetic, iters=4)  # batch 12 = 2 x 6
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(work_dir)


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['zero1_fp32', 'zero2_fp32', 'zero3_fp32',
                                   'zero3_offload_fp32', 'zero3'])
def test_two_process_zero_matches_single_process(stage, tmp_path, synthetic,
                                                 single_process_losses):
    """Same seed, initial weights, global batch (2 x 6 = 12) and data order. In fp32 the
    curves agree to float rounding (measured: 4.8e-7); in bf16 (`zero3`) the first loss,
    before any update, agrees to bf16 rounding and the rest drift apart."""
    result = train(tmp_path, synthetic, '--deepspeed', stage, iters=4, env=TWO,
                   options=PER_RANK)
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(tmp_path)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    if stage.endswith('_fp32'):
        assert max(abs(a - b) for a, b in zip(values, single_process_losses)) < 1e-5
    else:
        assert abs(values[0] - single_process_losses[0]) < 5e-3


# ---------------------------------------------------------------- non-finite loss


@pytest.mark.slow
def test_deepspeed_nonfinite_loss_on_one_rank_skips_on_all_then_stops(tmp_path, synthetic):
    config, env = config_with_module(
        tmp_path, 'nan_on_rank', NAN_MODEL,
        "model = dict(type='NaNOnStepsLLaVA', nan_steps=[2, 4, 5], nan_rank=1)\n")
    work_dir = tmp_path / 'w'
    result = train(work_dir, synthetic, '--deepspeed', 'zero2_fp32', iters=6, config=config,
                   env=env, options=[*PER_RANK, 'default_hooks.checkpoint.interval=1',
                                     'default_hooks.checkpoint.max_keep_ckpts=9',
                                     'nonfinite_loss.max_consecutive=2'])
    log = result.stdout + result.stderr
    assert 'non-finite loss' in log and 'optimizer step skipped' in log
    assert result.returncode != 0
    assert '2 consecutive optimizer steps had a non-finite loss' in result.stderr
    # step 2 skipped on both ranks: rank 0's shard of the weights is unchanged
    weights = {i: optimizer_shards(work_dir, f'iter_{i}.pth') for i in (1, 2, 3)}
    assert weights[1] and all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert not (work_dir / 'iter_5.pth').exists()
    values = losses(work_dir)
    assert math.isnan(values[1]) and all(math.isfinite(v) for v in values[:1] + values[2:3])


# ---------------------------------------------------------------- multi-node launch

@pytest.mark.parametrize('env,expected', [
    ({'NPROC_PER_NODE': '2'}, ['--nproc_per_node=2', '--nnodes=1', '--node_rank=0',
                               '--master_addr=127.0.0.1', '--master_port=29500']),
    ({'NPROC_PER_NODE': '8', 'NNODES': '2', 'NODE_RANK': '1', 'ADDR': '10.0.0.1',
      'PORT': '6000'}, ['--nproc_per_node=8', '--nnodes=2', '--node_rank=1',
                        '--master_addr=10.0.0.1', '--master_port=6000']),
    ({'SLURM_NNODES': '4', 'SLURM_NODEID': '3', 'MASTER_ADDR': 'node01', 'MASTER_PORT': '7000'},
     ['--nproc_per_node=1', '--nnodes=4', '--node_rank=3', '--master_addr=node01',
      '--master_port=7000']),
])
def test_train_relaunches_under_torchrun_with_the_node_settings(env, expected, monkeypatch):
    import subprocess
    import sys
    from mllm.cli import main
    for name in ('NPROC_PER_NODE', 'NNODES', 'NODE_RANK', 'ADDR', 'PORT', 'MASTER_ADDR',
                 'MASTER_PORT', 'SLURM_NNODES', 'SLURM_NODEID'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, 'argv', ['mllm', 'train', TINY, '--deepspeed', 'zero3'])
    launched = []
    monkeypatch.setattr(subprocess, 'run', lambda cmd: launched.append(cmd) or
                        types.SimpleNamespace(returncode=3))
    assert main(['train', TINY, '--deepspeed', 'zero3']) == 3  # torchrun's status passes on
    cmd = launched[0]
    assert cmd[1:3] == ['-m', 'mllm.engine.torchrun'] and cmd[3:8] == expected
    assert cmd[8:] == ['-m', 'mllm', 'train', TINY, '--deepspeed', 'zero3', '--launcher',
                       'pytorch']
