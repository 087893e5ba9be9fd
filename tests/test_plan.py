"""`mllm plan`: per-GPU memory under each ZeRO stage (formulas in mllm.bench.memory)."""
import json

import pytest

from mllm.cli import main
from mllm.engine.config import load_config
from mllm.bench.memory import STAGES, Transformer, activation_gb, model_state_gb, plan_memory
from helpers import swap_config




def plan_json(capsys, *args):
    capsys.readouterr()
    assert main(['plan', *args, '--json']) == 0
    return json.loads(capsys.readouterr().out)


def test_model_states_follow_the_zero_paper():
    """16 bytes per trainable parameter (2 + 2 + 12), sharded stage by stage."""
    psi, n = 10**9, 8
    assert model_state_gb('none', psi, psi, n, 0) == dict(weights=2, gradients=2, optimizer=12,
                                                          working_set=0)
    assert model_state_gb('zero1', psi, psi, n, 0)['optimizer'] == 1.5
    assert model_state_gb('zero2', psi, psi, n, 0)['gradients'] == 0.25
    assert model_state_gb('zero3', psi, psi, n, 10**8) == dict(
        weights=0.25, gradients=0.25, optimizer=1.5, working_set=0.4)
    # frozen parameters have no gradients and no optimizer state
    assert model_state_gb('zero1', psi, 0, n, 0) == dict(weights=2, gradients=0, optimizer=0,
                                                         working_set=0)


def test_activations_use_korthikanti_per_layer_formula():
    llm = Transformer(layers=1, hidden=4096, heads=32, flash=False)
    s, b = 2048, 1
    expected = s * b * 4096 * (34 + 5 * 32 * s / 4096) + 10 * s * b * 32000
    assert activation_gb(llm, 32000, s, b, checkpointing=False) == pytest.approx(expected / 1e9)
    llm.flash = True
    assert activation_gb(llm, 32000, s, b, False) == pytest.approx(
        (34 * s * b * 4096 + 10 * s * b * 32000) / 1e9)


def test_vicuna7b_finetune_fits_under_zero2(capsys):
    report = plan_json(capsys, 'llava15_vicuna7b_finetune', '--gpus', '8', '--gpu-mem', '80')
    assert set(report['stages']) == set(STAGES)
    assert all({'memory_gb', 'fits'} <= set(row) for row in report['stages'].values())
    assert report['stages']['zero2']['fits'] and report['cheapest'] in ('zero1', 'zero2')
    zero = report['stages']
    assert zero['zero1']['memory_gb'] > zero['zero2']['memory_gb'] > zero['zero3']['memory_gb']
    # checkpointing is on in the recipe; without it nothing fits at 16 x 2048 tokens
    assert report['gradient_checkpointing'] and report['seq_len'] == 2048
    assert not any(row['memory_gb_without_checkpointing'] <= 80 for row in zero.values())


def test_yi34b_full_finetune_fits_only_under_zero3_or_offload(tmp_path, capsys):
    config = swap_config(tmp_path, 'llava15_finetune', 'yi34b')
    report = plan_json(capsys, config, '--gpus', '8', '--gpu-mem', '80')
    stages = report['stages']
    assert not stages['zero1']['fits'] and not stages['zero2']['fits']
    assert stages['zero3']['fits'] or stages['zero3_offload']['fits']
    assert report['cheapest'] in ('zero3', 'zero3_offload')
    assert report['trainable_params'] > 34e9
    # model states alone are 16 bytes per trainable parameter over 8 GPUs
    states = sum(stages['zero3'][k] for k in ('weights', 'gradients', 'optimizer'))
    assert states == pytest.approx(16 * report['trainable_params'] / 8 / 1e9, rel=0.01)
    # at one sample per GPU, ZeRO-3 itself fits (no CPU offload needed)
    small = plan_json(capsys, config, '--cfg-options', 'train_dataloader.batch_size=1')
    assert small['cheapest'] == 'zero3'


def test_plan_text_output_names_the_cheapest_stage(capsys):
    capsys.readouterr()
    assert main(['plan', 'configs/tiny/tiny_llava_synthetic.py', '--gpus', '1',
                 '--gpu-mem', '16']) == 0
    out = capsys.readouterr().out
    assert 'cheapest stage that fits: zero1' in out and 'zero3_offload' in out


def test_plan_memory_on_a_loaded_config_uses_the_dataset_length():
    cfg = load_config('configs/tiny/tiny_llava_synthetic.py')
    report = plan_memory(cfg, gpus=1, gpu_mem_gb=1, precision='fp32', overhead_gb=0)
    assert report['seq_len'] == 256 and report['batch_per_gpu'] == 32
    short = plan_memory(cfg, gpus=1, gpu_mem_gb=1, precision='fp32', seq_len=64, overhead_gb=0)
    assert short['stages']['zero1']['activations_gb'] < report['stages']['zero1']['activations_gb']
