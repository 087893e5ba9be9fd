"""Training curves: throughput logging (exact arithmetic, and in a real run's scalars.json),
joining resumed launches, overlaying runs in one PNG."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mllm.cli import main
from mllm.evaluation.curves import read_run
from mllm.engine.config import CONFIG_ROOT

REPO = os.path.dirname(CONFIG_ROOT)


def write_launch(work_dir, stamp, records):
    path = work_dir / stamp / 'vis_data' / 'scalars.json'
    path.parent.mkdir(parents=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def records(steps, loss=1.0, **extra):
    return [dict(loss=loss, lr=0.1, grad_norm=2.0, step=s, iter=s, **extra) for s in steps]


def test_read_run_joins_resumed_launches_and_replaces_restarts(tmp_path):
    write_launch(tmp_path, '20260101_000000', records([1, 2, 3, 4], loss=1.0))
    write_launch(tmp_path, '20260101_010000', records([4, 5, 6], loss=2.0))  # resumed at 3
    assert [(r['step'], r['loss']) for r in read_run(str(tmp_path))] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]
    write_launch(tmp_path, '20260102_000000', records([1, 2], loss=3.0))  # fresh re-run
    assert [(r['step'], r['loss']) for r in read_run(str(tmp_path))] == [(1, 3.0), (2, 3.0)]


def test_plot_overlays_runs_and_fails_clearly_without_logs(tmp_path, capsys):
    a, b = tmp_path / 'vicuna7b', tmp_path / 'llama3_8b'
    write_launch(a, '20260101_000000', records(range(1, 11), tokens_per_s=100.0))
    write_launch(b, '20260101_000000', records(range(1, 6)))
    out = tmp_path / 'sweep.png'
    assert main(['plot', str(a), str(b), '--out', str(out)]) == 0
    assert 'loss, lr, grad_norm, tokens_per_s of 2 run(s)' in capsys.readouterr().out
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
    assert main(['plot', str(tmp_path / 'empty')]) == 1
    assert 'no training logs' in capsys.readouterr().err


def test_throughput_hook_arithmetic(monkeypatch):
    from mmengine.logging import MessageHub

    from mllm.engine.hooks import ThroughputHook

    clock = iter([10.0, 12.0, 12.5])
    monkeypatch.setattr('time.perf_counter', lambda: next(clock))
    hub = MessageHub(name='throughput-test')
    runner = SimpleNamespace(message_hub=hub, model=torch.nn.Linear(2, 2))
    hook = ThroughputHook()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 tokens, 2 samples
    hook.before_train_iter(runner, 0, dict(attention_mask=mask))
    hook.after_train_iter(runner, 0, dict(attention_mask=mask))  # 2 s
    assert hub.get_scalar('train/tokens_per_s').current() == 3.5
    assert hub.get_scalar('train/samples_per_s').current() == 1.0
    hook.before_train_iter(runner, 1, dict(attention_mask=mask))
    hook.after_train_iter(runner, 1, dict(attention_mask=mask[:1]))  # 0.5 s, 3 tokens
    assert hub.get_scalar('train/tokens_per_s').current() == 6.0
    assert hub.get_scalar('train/samples_per_s').current() == 2.0


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=64,
                                  num_val=8)


def test_training_logs_throughput_and_plots_it(tmp_path, synthetic):
    result = subprocess.run(
        [sys.executable, '-m', 'mllm', 'train', 'configs/tiny/tiny_llava_synthetic.py',
         '--work-dir', str(tmp_path), '--cfg-options', 'train_cfg.max_iters=3',
         'default_hooks.logger.interval=1', 'train_dataloader.batch_size=4',
         f'train_dataloader.dataset.data_path={synthetic["train"]}',
         f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}',
         f'tokenizer.pretrained={synthetic["tokenizer"]}'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_run(str(tmp_path))
    assert [r['step'] for r in steps] == [1, 2, 3]
    for r in steps:
        # every synthetic sample is BOS + prompt + 64 visual tokens + one-word answer + </s>
        tokens_per_sample = r['tokens_per_s'] / r['samples_per_s']
        assert 64 < tokens_per_sample < 120
        assert 'tflops_per_gpu' not in r  # CPU
    assert main(['plot', str(tmp_path)]) == 0
    assert os.path.isfile(tmp_path / 'curves.png')
