"""Checkpoints: no code runs from a checkpoint on any route, checksums catch damage,
and ``--resume auto`` does what the user meant (issue 16, items 1, 3 and 4)."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from mmengine.config import Config

from helpers import TINY, losses, run_mllm, train
from mllm.engine.checkpoint import (CheckpointError, decode_state, encode_state,
                                    load_checkpoint_file, newest_valid_checkpoint,
                                    verify_checkpoint, write_checksums)


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=48,
                                  num_val=8)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def write_malicious(path, marker, **extra):
    """A checkpoint-shaped pickle whose loading would run code (with an empty state dict
    unless ``extra`` says otherwise)."""
    torch.save({'state_dict': {}, 'meta': {'iter': 2, 'epoch': 0}, 'payload': Payload(marker),
                **extra}, path)
    return str(path)


# ------------------------------------------------------------------ item 1: no code runs

def test_the_payload_really_runs_under_the_full_unpickler(tmp_path):
    """The test's premise: the crafted file does execute when unpickled without care."""
    marker = tmp_path / 'ran'
    torch.load(write_malicious(tmp_path / 'evil.pth', marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('route', ['load-from', 'resume-path', 'resume-auto'])
def test_train_never_unpickles_code(route, tmp_path, synthetic):
    marker, work = tmp_path / 'ran', tmp_path / 'work'
    work.mkdir()
    if route == 'resume-auto':  # a complete-looking checkpoint with a valid checksum
        evil = write_malicious(work / 'iter_2.pth', marker)
        write_checksums(evil)
        extra = ['--resume', 'auto']
    else:
        evil = write_malicious(tmp_path / 'evil.pth', marker)
        extra = ['--load-from' if route == 'load-from' else '--resume', evil]
    result = train(work, synthetic, *extra, iters=2)
    assert result.returncode == 1
    assert f'pass --trust-checkpoint {evil}' in result.stderr
    assert 'posix.system' in result.stderr  # names what it refused
    assert not marker.exists()


def test_convert_chat_and_the_loaders_never_unpickle_code(tmp_path, synthetic):
    marker = tmp_path / 'ran'
    evil = write_malicious(tmp_path / 'evil.pth', marker)
    image = next(glob.iglob(os.path.join(synthetic['image_folder'], '**', '*.png'), recursive=True))
    tokenizer = f'tokenizer.pretrained={synthetic["tokenizer"]}'
    convert = run_mllm('convert', 'pth-to-hf', TINY, evil, str(tmp_path / 'out'),
                       '--cfg-options', tokenizer)
    chat = run_mllm('chat', TINY, '--checkpoint', evil, '--image', image, '--prompt', 'hi',
                    '--cfg-options', tokenizer)
    for result in (convert, chat):
        assert result.returncode == 1 and 'pass --trust-checkpoint' in result.stderr
    assert not marker.exists()

    # MMEngine's loader (load_from / resume), DeepSpeed's per-file loader, timm's
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from mmengine.runner.checkpoint import CheckpointLoader

    from mllm.engine import patches
    from mllm.models.convnext import ConvNeXtEncoder
    patches.patch_checkpoint_loading()
    patches.deepspeed_checkpoint_loading()
    shard = tmp_path / 'iter_2.pth' / 'mp_rank_00_model_states.pt'
    shard.parent.mkdir()
    write_malicious(shard, marker, module={})
    for load, path in ((CheckpointLoader.load_checkpoint, evil),
                       (TorchCheckpointEngine(None).load, str(shard))):
        with pytest.raises(CheckpointError, match='--trust-checkpoint'):
            load(path)
    with pytest.raises(CheckpointError, match='--trust-checkpoint'):
        ConvNeXtEncoder(backend='timm', model_name='convnext_atto', pretrained=evil,
                        model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)))
    assert not marker.exists()


def test_trust_checkpoint_names_the_file_it_allows(tmp_path):
    from mllm.engine import checkpoint
    marker = tmp_path / 'ran'
    evil = write_malicious(tmp_path / 'evil.pth', marker)
    other = write_malicious(tmp_path / 'other.pth', marker)
    checkpoint.trust_checkpoint(evil)
    try:
        with pytest.raises(CheckpointError):
            load_checkpoint_file(other)  # trusting one file trusts no other
        assert not marker.exists()
        load_checkpoint_file(evil)
        assert marker.exists()
    finally:
        checkpoint._trusted.clear()


def test_runner_state_is_stored_as_plain_types_and_comes_back_exactly():
    from mmengine.logging import HistoryBuffer, MessageHub
    import random

    hub = MessageHub('safe-test')
    for i in range(5):
        hub.update_scalar('train/loss', 1.0 / (i + 3))
    hub.update_info('eta', np.float64(12.345678901234567))
    state = dict(message_hub=hub.state_dict(), rng_state=dict(
        python=random.getstate(), numpy=np.random.RandomState(7).get_state(),
        torch=torch.get_rng_state()))
    encoded = encode_state(state)
    path = '/tmp/mllm-safe-test.pth'
    torch.save(encoded, path)
    decoded = decode_state(torch.load(path, weights_only=True))  # the safe loader accepts it
    os.remove(path)
    buffer = decoded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert np.array_equal(buffer.data[0], hub.get_scalar('train/loss').data[0])
    assert buffer.data[0].dtype == hub.get_scalar('train/loss').data[0].dtype
    eta = decoded['message_hub']['runtime_info']['eta']
    assert type(eta) is np.float64 and eta == np.float64(12.345678901234567)
    numpy_state = decoded['rng_state']['numpy']
    reference = np.random.RandomState(7).get_state()
    assert numpy_state[0] == reference[0] and np.array_equal(numpy_state[1], reference[1])
    assert numpy_state[1].dtype == reference[1].dtype
    restored = np.random.RandomState()
    restored.set_state(numpy_state)
    assert restored.rand() == np.random.RandomState(7).rand()
    assert decoded['rng_state']['python'] == state['rng_state']['python']


# ------------------------------------------------------------------ items 3 and 4: resume

def fake_checkpoint(path, iteration, checksum=True):
    torch.save({'state_dict': {'w': torch.full((4,), float(iteration))},
                'meta': {'iter': iteration}}, path)
    if checksum:
        write_checksums(str(path))
    return str(path)


def resolve(work_dir, resume=None, load_from=None, **cfg):
    from mllm.engine.runner import resolve_start
    config = Config(dict(load_from=None, **cfg))
    resolve_start(config, str(work_dir), resume, load_from)
    return config.resume, config.load_from


def test_resume_auto_in_an_empty_work_dir_starts_from_load_from(tmp_path):
    assert resolve(tmp_path, 'auto', '/stage1/iter_9.pth') == (False, '/stage1/iter_9.pth')
    assert resolve(tmp_path / 'new', 'auto') == (False, None)
    with pytest.raises(ValueError, match='pass --load-from PATH'):
        resolve(tmp_path, 'auto', load_from_required='the stage-1 checkpoint')
    fake_checkpoint(tmp_path / 'iter_4.pth', 4)  # once it has a checkpoint, that one wins
    assert resolve(tmp_path, 'auto', '/stage1/iter_9.pth') == (True, str(tmp_path / 'iter_4.pth'))
    assert resolve(tmp_path, 'auto', load_from_required='x')[0]


def test_a_fresh_run_refuses_a_work_dir_with_another_runs_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / 'iter_2.pth', 2)
    with pytest.raises(RuntimeError, match=r'already holds checkpoints of another run \(iter_2'):
        resolve(tmp_path)


def test_resume_auto_scans_the_work_dir_and_skips_damaged_checkpoints(tmp_path, caplog):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path / f'iter_{step}.pth', step)
    (tmp_path / 'last_checkpoint').write_text('/elsewhere/iter_2.pth')  # stale: not followed
    assert newest_valid_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_6.pth')

    data = bytearray((tmp_path / 'iter_6.pth').read_bytes())  # 64 flipped bytes
    data[400:464] = bytes(b ^ 0xFF for b in data[400:464])
    (tmp_path / 'iter_6.pth').write_bytes(bytes(data))
    (tmp_path / 'iter_4.pth').write_bytes(b'')  # zero bytes
    warnings = []
    from mllm.engine import checkpoint
    original = checkpoint.print_log
    checkpoint.print_log = lambda msg, **kw: warnings.append(msg)
    try:
        assert newest_valid_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
    finally:
        checkpoint.print_log = original
    assert 'iter_6.pth is damaged' in warnings[0] and 'iter_4.pth is empty (0 bytes)' in warnings[1]
    with pytest.raises(CheckpointError, match=r'iter_6.pth is damaged: its sha256 differs'):
        load_checkpoint_file(str(tmp_path / 'iter_6.pth'))
    (tmp_path / 'iter_2.pth').write_bytes(b'')
    with pytest.raises(RuntimeError, match='no checkpoint of .* is complete and intact'):
        resolve(tmp_path, 'auto')  # never starts over on top of them


def test_unverified_files_give_named_errors_and_partials_are_cleaned(tmp_path):
    path = fake_checkpoint(tmp_path / 'model.pth', 1, checksum=False)
    assert load_checkpoint_file(path)['meta']['iter'] == 1
    data = (tmp_path / 'model.pth').read_bytes()
    (tmp_path / 'model.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r'model.pth is damaged or truncated'):
        load_checkpoint_file(path)
    assert 'no iter_3.pth.sha256' in verify_checkpoint(
        fake_checkpoint(tmp_path / 'iter_3.pth', 3, checksum=False))

    partial = tmp_path / 'work' / '.iter_8.pth.partial'
    partial.mkdir(parents=True)
    (partial / 'mp_rank_00_model_states.pt').write_bytes(b'half')
    fake_checkpoint(tmp_path / 'work' / 'iter_6.pth', 6)
    assert resolve(tmp_path / 'work', 'auto') == (True, str(tmp_path / 'work' / 'iter_6.pth'))
    assert not partial.exists()


def test_load_from_with_resume_auto_and_a_moved_work_dir(tmp_path, synthetic):
    """End to end: `--load-from X --resume auto` in an empty work dir starts from X (the
    README's Slurm habit); a work dir moved elsewhere resumes from its own files and gives
    the uninterrupted curve."""
    stage1 = tmp_path / 'stage1'
    assert train(stage1, synthetic, iters=2).returncode == 0
    fresh = train(tmp_path / 'fresh', synthetic, iters=1)
    loaded = train(tmp_path / 'loaded', synthetic, '--load-from', str(stage1 / 'iter_2.pth'),
                   iters=1)
    auto = train(tmp_path / 'auto', synthetic, '--load-from', str(stage1 / 'iter_2.pth'),
                 '--resume', 'auto', iters=1)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert losses(tmp_path / 'auto') == losses(tmp_path / 'loaded') != losses(tmp_path / 'fresh')

    full, first = tmp_path / 'full', tmp_path / 'first'
    assert train(full, synthetic, iters=4).returncode == 0
    assert train(first, synthetic, iters=2).returncode == 0
    moved = tmp_path / 'moved'
    shutil.move(str(first), str(moved))
    resumed = train(moved, synthetic, '--resume', 'auto', iters=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'--resume auto: resuming from {moved / "iter_2.pth"}' in resumed.stdout + resumed.stderr
    assert losses(moved) == losses(full)
    assert (moved / 'last_checkpoint').read_text() == 'iter_4.pth'
    assert verify_checkpoint(str(moved / 'iter_4.pth')) is None
