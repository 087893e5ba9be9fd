"""Reliability: resume that jumps to the data position (bit-exact), atomic checkpoints and
retention, non-finite steps skipped, bad samples skipped or fatal (issue 7)."""
import glob
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers import NAN_MODEL, REPO, TINY, losses, run_mllm, train  # noqa: F401 (re-exported)



@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=48,
                                  num_val=8)


def state(path):
    """A checkpoint as mllm loads it: torch's safe loader, runner state decoded."""
    from mllm.engine.checkpoint import load_checkpoint_file
    return load_checkpoint_file(str(path))


# ---------------------------------------------------------------- resume without replay

class Indices(Dataset):
    def __init__(self, n):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return i


@pytest.mark.parametrize('sampler', ['DefaultSampler', 'LengthGroupedSampler'])
def test_seek_dataloader_gives_the_uninterrupted_order_without_loading(sampler, monkeypatch):
    from mmengine.dataset import DefaultSampler
    from mmengine.runner import loops as mmengine_loops
    from mllm.datasets.samplers import LengthGroupedSampler  # XTuner's, imported via compat
    from mllm.engine.loops import seek_dataloader
    monkeypatch.setattr(mmengine_loops.time, 'sleep', lambda s: None)  # epoch-change pause

    def loader():
        data = Indices(10)
        if sampler == 'DefaultSampler':
            s = DefaultSampler(data, shuffle=True, seed=3)
        else:
            data.modality_length = [(-1) ** i * (i + 1) for i in range(10)]
            s = LengthGroupedSampler(data, per_device_batch_size=3, seed=3,
                                     length_property='modality_length')
        return DataLoader(data, batch_size=3, sampler=s), data

    reference = mmengine_loops._InfiniteDataloaderIterator(loader()[0])
    order = [next(reference).tolist() for _ in range(14)]  # 4 batches per epoch, 3.5 epochs
    assert order[:4] != order[4:8]  # epochs are reshuffled
    for position in (1, 4, 6, 9, 13):
        dataloader, data = loader()
        iterator = seek_dataloader(dataloader, position)
        assert [next(iterator).tolist() for _ in range(14 - position)] == order[position:]
        # only the batches actually returned were loaded, none of the skipped ones
        assert len(data.loaded) == sum(len(b) for b in order[position:])


def test_kill_during_save_then_resume_auto_is_bit_exact(tmp_path, synthetic):
    """SIGKILL-like exit in the middle of writing iter_6 (2 epochs of 4 batches in all):
    the previous checkpoint stays named and complete, `--resume auto` takes it, jumps to
    the data position (no replay) and reproduces the uninterrupted curve bit for bit;
    retention keeps the last two checkpoints."""
    full, split = tmp_path / 'full', tmp_path / 'split'
    options = ['default_hooks.checkpoint.max_keep_ckpts=2']
    result = train(full, synthetic, iters=8, options=options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (full / 'iter_4.pth').exists()  # retention: the last two only
    assert (full / 'iter_6.pth').exists() and (full / 'iter_8.pth').exists()

    kill_third_save = '''
import os
from mmengine.fileio.backends import LocalBackend
put, saves = LocalBackend.put, []
def dying_put(self, obj, filepath):
    saves.append(filepath)
    if len(saves) == 3:  # half of iter_6 reaches the disk, then the process dies
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        os._exit(137)
    return put(self, obj, filepath)
LocalBackend.put = dying_put
'''
    killed = train(split, synthetic, iters=8, options=options, pre=kill_third_save)
    assert killed.returncode == 137
    assert (split / 'last_checkpoint').read_text() == 'iter_4.pth'  # relative: the dir may move
    assert (split / '.iter_6.pth.partial').exists() and not (split / 'iter_6.pth').exists()
    assert state(split / 'iter_4.pth')['meta']['iter'] == 4  # complete and loadable

    resumed = train(split, synthetic, '--resume', 'auto', iters=8, options=options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert 'data position set to iter 4 (epoch 1, batch 0 of 4)' in log
    assert 'Advance dataloader' not in log  # MMEngine's replay is gone
    full_losses = losses(full)
    assert len(full_losses) == 8 and losses(split) == full_losses[:6] + full_losses[4:]
    assert sorted(p.name for p in split.glob('*.pth')) == ['iter_6.pth', 'iter_8.pth']
    a, b = state(full / 'iter_8.pth'), state(split / 'iter_8.pth')
    assert a['state_dict'].keys() == b['state_dict'].keys()
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])


@pytest.mark.slow
def test_resume_mid_epoch_is_bit_exact(tmp_path, synthetic):
    """Resume at iter 6 = epoch 1, batch 2: the sampler epoch and start offset both matter."""
    full, split = tmp_path / 'full', tmp_path / 'split'
    assert train(full, synthetic, iters=10).returncode == 0
    assert train(split, synthetic, iters=6).returncode == 0
    resumed = train(split, synthetic, '--resume', 'auto', iters=10)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'data position set to iter 6 (epoch 1, batch 2 of 4)' in resumed.stdout + resumed.stderr
    assert losses(split) == losses(full)


# ---------------------------------------------------------------- non-finite loss


def nan_config(tmp_path, nan_steps):
    (tmp_path / 'nan_model.py').write_text(NAN_MODEL)
    path = tmp_path / 'nan_config.py'
    path.write_text(f"_base_ = ['{TINY}']\ncustom_imports = dict(imports=['nan_model'])\n"
                    f"model = dict(type='NaNOnStepsLLaVA', nan_steps={list(nan_steps)})\n")
    return str(path), {'PYTHONPATH': str(tmp_path)}


def test_nonfinite_loss_skips_the_step_then_stops_after_k_in_a_row(tmp_path, synthetic):
    config, env = nan_config(tmp_path, nan_steps=[2, 4, 5])
    options = ['default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=9',
               'nonfinite_loss.max_consecutive=2']
    result = train(tmp_path / 'w', synthetic, iters=6, config=config, options=options, env=env)
    log = result.stdout + result.stderr
    # step 2 skipped: weights and optimizer state exactly as after step 1
    s1, s2, s3 = (state(tmp_path / 'w' / f'iter_{i}.pth') for i in (1, 2, 3))
    assert all(torch.equal(s1['state_dict'][k], s2['state_dict'][k]) for k in s1['state_dict'])
    assert s1['optimizer']['state'][0]['step'] == s2['optimizer']['state'][0]['step'] == 1
    assert not all(torch.equal(s2['state_dict'][k], s3['state_dict'][k]) for k in s2['state_dict'])
    assert 'non-finite loss nan: optimizer step skipped' in log
    # steps 4 and 5 in a row: stop with a clear error, nothing written for them
    assert result.returncode != 0
    assert '2 consecutive optimizer steps had a non-finite loss' in result.stderr
    assert not (tmp_path / 'w' / 'iter_5.pth').exists()
    for path in glob.glob(str(tmp_path / 'w' / 'iter_*.pth')):
        weights = state(path)['state_dict'].values()
        assert all(torch.isfinite(w).all() for w in weights)


@pytest.mark.slow
def test_nan_weights_are_never_checkpointed(tmp_path, synthetic):
    """With the skipping turned off, NaN weights reach the save, which refuses them."""
    config, env = nan_config(tmp_path, nan_steps=[2])
    result = train(tmp_path / 'w', synthetic, iters=2, config=config, env=env,
                   options=['default_hooks.checkpoint.interval=1', 'nonfinite_loss=None'])
    assert result.returncode != 0 and 'refusing to write a checkpoint' in result.stderr
    assert (tmp_path / 'w' / 'last_checkpoint').read_text().endswith('iter_1.pth')
    assert not (tmp_path / 'w' / 'iter_2.pth').exists()


# ---------------------------------------------------------------- bad samples

def data_with_deleted_images(tmp_path, synthetic, bad):
    with open(synthetic['train']) as f:
        samples = json.load(f)
    for i in bad:
        samples[i]['image'] = 'train/deleted.png'
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(samples))
    return str(path)


def test_bad_sample_policy_skip_through_the_cli(tmp_path, synthetic):
    path = data_with_deleted_images(tmp_path, synthetic, bad=[5])
    result = train(tmp_path / 'w', synthetic, iters=4, options=[
        f'train_dataloader.dataset.data_path={path}',
        'train_dataloader.dataset.bad_sample_policy=skip',
        'train_dataloader.dataset.max_skipped_ratio=0.05'])
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert 'skipped a bad sample (1 so far, stop above 2.4)' in log
    assert 'index 5 (id train_000005): image not found' in log
    assert len(losses(tmp_path / 'w')) == 4


def test_bad_sample_policy_threshold_and_default_error(tmp_path, synthetic):
    from mllm.datasets.llava import DataError, LLaVADataset
    path = data_with_deleted_images(tmp_path, synthetic, bad=[3, 4])
    kwargs = dict(data_path=path, image_folder=synthetic['image_folder'],
                  tokenizer=dict(pretrained=synthetic['tokenizer']), template='vicuna_v1',
                  image_processor=dict(type='LLaVAImageProcessor', size=64, token_stride=8))
    with pytest.raises(DataError, match=r'index 3 \(id train_000003\): image not found'):
        LLaVADataset(**kwargs)[3]  # default policy: stop, naming the sample
    skip = LLaVADataset(**kwargs, bad_sample_policy='skip', max_skipped_ratio=0.05)
    assert skip[3]['index'] == 5  # the next readable sample stands in
    assert skip.skipped == {3, 4}  # 2 of 48 <= 2.4
    strict = LLaVADataset(**kwargs, bad_sample_policy='skip', max_skipped_ratio=0.03)
    with pytest.raises(DataError, match='2 of 48 samples were bad, more than max_skipped_ratio=0.03'):
        strict[3]
    with pytest.raises(ValueError, match='bad_sample_policy'):
        LLaVADataset(**kwargs, bad_sample_policy='ignore')


# ---------------------------------------------------------------- security basics

class Opaque:
    """A class torch's safe loader does not know (any third-party object)."""


def test_checkpoints_load_only_through_the_safe_loader(tmp_path):
    """MMEngine's loader and DeepSpeed's checkpoint engine both take weights and MMEngine's
    ConfigDict with weights_only=True; any other object is refused, naming the class and
    the flag, with no fallback to the full unpickler."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from mmengine.config import ConfigDict
    from mmengine.runner.checkpoint import CheckpointLoader

    from mllm.engine import patches
    from mllm.engine.checkpoint import CheckpointError
    weights, runner_state, other = (tmp_path / n for n in ('w.pth', 'runner.pth', 'other.pth'))
    torch.save({'state_dict': {'w': torch.ones(2)}}, weights)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'cfg': ConfigDict(a=1)}, runner_state)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'thing': Opaque()}, other)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(runner_state)  # what torch >= 2.6 does unpatched

    patches.patch_checkpoint_loading()
    patches.deepspeed_checkpoint_loading()
    for load in (CheckpointLoader.load_checkpoint, TorchCheckpointEngine(None).load):
        assert torch.equal(load(str(weights))['state_dict']['w'], torch.ones(2))
        assert load(str(runner_state))['cfg'] == ConfigDict(a=1)
        with pytest.raises(CheckpointError, match=r'test_reliability.Opaque\).*--trust-checkpoint'):
            load(str(other))


def test_remote_code_in_a_checkpoint_does_not_run_unless_the_config_asks(tmp_path):
    """A checkpoint folder whose config maps to its own Python file: building the LLM or
    its tokenizer refuses to import it by default."""
    from mllm.models.llms import HFCausalLM, build_tokenizer
    folder = tmp_path / 'remote'
    folder.mkdir()
    marker = tmp_path / 'ran'
    (folder / 'evil.py').write_text(f'open({str(marker)!r}, "w").close()\n')
    (folder / 'config.json').write_text(json.dumps({
        'model_type': 'evil', 'auto_map': {'AutoConfig': 'evil.EvilConfig',
                                           'AutoModelForCausalLM': 'evil.EvilModel'}}))
    (folder / 'tokenizer_config.json').write_text(json.dumps({
        'auto_map': {'AutoTokenizer': ['evil.EvilTokenizer', None]}}))
    with pytest.raises(Exception, match='trust_remote_code'):
        HFCausalLM(pretrained=str(folder), load_weights=False)
    with pytest.raises(Exception, match='trust_remote_code'):
        build_tokenizer(dict(pretrained=str(folder)))
    assert not marker.exists()


@pytest.mark.parametrize('name', ['../outside.png', 'a/../../outside.png', '/etc/passwd'])
def test_benchmark_image_names_may_not_escape_the_image_folder(tmp_path, name):
    from mllm.evaluation import benchmarks
    from mllm.datasets.llava import DataError
    folder = tmp_path / 'images'
    assert benchmarks._image(str(folder), 'q1/img.png') == str(folder / 'q1' / 'img.png')
    with pytest.raises(DataError, match='points outside the image folder'):
        benchmarks._image(str(folder), name)


def test_timm_weights_file_loads_through_the_safe_loader(tmp_path):
    """ConvNeXtEncoder(backend='timm') loads a local file through timm, which would unpickle
    it with weights_only=False; a plain state dict loads, a file with other objects only
    once the user trusts it by name."""
    import timm
    from mmengine.config import ConfigDict

    from mllm.engine import checkpoint
    from mllm.models.convnext import ConvNeXtEncoder
    tiny = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    model = timm.create_model('convnext_atto', **tiny)
    plain, extra = tmp_path / 'plain.pth', tmp_path / 'extra.pth'
    torch.save(model.state_dict(), plain)
    torch.save({'state_dict': model.state_dict(), 'cfg': ConfigDict(a=1)}, extra)

    def build(path):
        return ConvNeXtEncoder(backend='timm', model_name='convnext_atto', model_kwargs=tiny,
                               pretrained=str(path))

    with pytest.raises(checkpoint.CheckpointError, match=f'--trust-checkpoint {extra}'):
        build(extra)
    checkpoint.trust_checkpoint(str(extra))
    try:
        for path in (plain, extra):
            assert torch.equal(build(path).stages[3].blocks[0].conv_dw.weight,
                               model.stages[3].blocks[0].conv_dw.weight)
    finally:
        checkpoint._trusted.clear()
