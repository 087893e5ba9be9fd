"""The 7B-proportioned `bench train` presets, its ablation and FLOP projection, and the GPU
kit (`mllm bench gpu`, tools/bench_gpu.sh, tools/gpu_wheels.sh) on their CPU path."""
import json
import os
import subprocess
import sys

import pytest

from mllm.bench.benchmark import (BENCH_PRESETS, head_flops_share, project_terms_7b,
                                  seven_b_activation_room)


def test_presets_keep_7b_proportions():
    """'7b-like': vocabulary 32,000, >= 8 layers, the LM head <= 5 % of the LLM's FLOPs,
    >= 4096 samples, XTuner's checkpointing against the plan; 'cpu' keeps the head share
    and depth at a CPU budget (which a 32,000 vocabulary cannot)."""
    big = BENCH_PRESETS['7b-like']
    config = dict(big['llm_config'], num_hidden_layers=big['llm_layers'])
    assert config['vocab_size'] == 32000 and big['llm_layers'] >= 8
    assert head_flops_share(config) <= 0.05 and big['num_samples'] >= 4096
    assert big['checkpointing']
    cpu = BENCH_PRESETS['cpu']
    assert head_flops_share(dict(cpu['llm_config'], num_hidden_layers=cpu['llm_layers'])) <= 0.05
    assert cpu['llm_layers'] >= 8 and cpu['num_samples'] >= 4096
    # vicuna-7B itself: 2.0 %
    assert head_flops_share(dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32)) == pytest.approx(0.0195, abs=0.001)


def test_memory_room_is_the_7b_plans():
    """The planner's budget in the benchmark: LLaVA-1.5-7B's room for activations at 8 x 80
    GB under ZeRO-2 (22 of 32 layers checkpointed), as a share of all its activations."""
    room = seven_b_activation_room()
    assert 0.36 < room < 0.39
    # (b (L - K) + 2 h K) / b L <= room at K = 22, not at K = 21; b a kept layer's bytes
    # per token (vicuna-7B with the recipe's fused kernels, mllm.bench.memory), h = 4096
    b, h2 = 110_216, 2 * 4096
    assert (b * 10 + h2 * 22) / (b * 32) <= room < (b * 11 + h2 * 21) / (b * 32)


def test_projection_terms_add_up():
    """Each term's share of XTuner's step, from the measured padding and answers."""
    result = dict(tokens_timed=1000, padded_tokens_xtuner=1100, learned_tokens_timed=200)
    terms = project_terms_7b(result, dict(checkpoint_layers=24, layers=32))
    parts = sum(terms[k] for k in ('padding_free', 'answer_only_head', 'last_layer_mlp',
                                   'recompute'))
    assert 0 < terms['recompute'] < 0.25 * 1 / 3 * 1.01
    # XTuner's step over mllm's is 1 / (1 - the removed share)
    assert terms['xtuner_step_over_mllm'] == pytest.approx(1 / (1 - parts), rel=1e-9)
    # per-batch recompute: the share mllm recomputed on average, not the worst batch's
    per_batch = project_terms_7b(dict(result, checkpoint_layers_per_step=[2, 6, 4, 4]),
                                 dict(checkpoint_layers=6, layers=8))
    assert per_batch['checkpointed_share'] == 0.5
    assert per_batch['xtuner_step_over_mllm'] > terms['xtuner_step_over_mllm']


@pytest.mark.slow  # ~60 s on a shared CPU
def test_bench_train_checkpointing_and_ablation(tmp_path, capsys):
    from mllm.cli import main
    assert main(['bench', 'train', '--json', '--steps', '3', '--batch-size', '4', '--samples',
                 '24', '--llm-layers', '4', '--checkpointing', '--ablation',
                 '--work-dir', str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['xtuner_checkpointing'] and result['max_loss_diff'] < 1e-4
    assert set(result['ablation']) == {'padded', 'full_head', 'full_last_layer', 'full_recompute'}
    assert all(v['max_loss_diff_vs_mllm'] < 1e-4 for v in result['ablation'].values())
    policy = result['checkpoint_policy']
    assert 0 <= policy['checkpoint_layers'] <= 4
    # each step re-chose its layers from its own tokens, never more than the worst batch's
    per_step = result['checkpoint_layers_per_step']
    assert len(per_step) == 3 and all(0 <= k <= policy['checkpoint_layers'] for k in per_step)
    from mllm.models.llms import layers_to_checkpoint
    assert layers_to_checkpoint(policy['worst_batch_tokens'], 4, **policy['per_batch']) == (
        policy['checkpoint_layers'])


def test_bench_gpu_cpu_path():
    """The kit's code on the tiny config on CPU: every variant ran on the same batches with
    the same losses, MFU against the measured peak, the plan's layers recorded."""
    from mllm.bench.gpu import bench_gpu
    result = bench_gpu(tiny=True, steps=1)
    variants = result['variants']
    assert set(variants) >= {'xtuner_way', 'mllm', 'mllm_full_recompute', 'mllm_no_recompute',
                             'mllm_micro_batch_8x2', 'mllm_fused', 'mllm_fused_per_batch'}
    assert all('error' not in v for v in variants.values()), variants
    losses = [v['losses'][0] for v in variants.values()]
    assert max(losses) - min(losses) < 1e-4  # padded or flat, any recompute: the same loss
    assert variants['mllm']['checkpoint_layers'] == result['plan']['checkpoint_layers'] == 1
    assert variants['xtuner_way']['checkpoint_layers'] == 2
    assert result['matmul_peak_tflops'] > 0
    mllm = variants['mllm']
    assert mllm['mfu'] == pytest.approx(mllm['model_tflops'] / result['matmul_peak_tflops'])
    recipes = variants[result['recipes_variant']]  # the headline: the recipes' defaults
    assert result['recipes_variant'] == 'mllm_fused_per_batch'
    assert result['mllm_step_over_xtuner'] == pytest.approx(
        recipes['step_s'] / variants['xtuner_way']['step_s'])


def test_gpu_wheels_fit_the_carry_limit(tmp_path):
    """The wheels the kit installs there: pure-Python, py3.12-compatible, a few MiB."""
    wheels = 'work_dirs/gpu_wheels'
    if not os.path.isdir(wheels):
        pytest.skip('run tools/gpu_wheels.sh first (needs the package index)')
    files = os.listdir(wheels)
    assert any(f.startswith('mmengine-') for f in files)
    assert all(f.endswith('-py3-none-any.whl') for f in files), files
    assert sum(os.path.getsize(os.path.join(wheels, f)) for f in files) < 60 * 2 ** 20


@pytest.mark.slow  # ~2 min on a shared CPU
def test_bench_gpu_sh_tiny_runs_unattended(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=os.path.join('.venv', 'bin', 'python'))
    out = subprocess.run(['tools/bench_gpu.sh', '--tiny'], env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / 'bench_gpu.log').read_text()
    assert 'gpu: ok' in log and 'step_tiny: ok' in log
    assert "mllm step (mllm_fused_per_batch) / XTuner's" in log
    step = json.loads((tmp_path / 'step_tiny.json').read_text().strip().splitlines()[-1])
    assert step['device'] == 'cpu' and step['seq_len'] == 85
    assert step['projected_hours_8xA100'] > 0


def test_bench_step_resolves_auto_for_8x80_zero2():
    """The recipes' 'auto' reaches `bench step` (the kit's per-recipe part) as the plan's
    layers, not as an error."""
    from mllm.bench.benchmark import bench_step
    from mllm.engine.config import load_config
    cfg = load_config('configs/tiny/tiny_llava_synthetic.py',
                      {'model.gradient_checkpointing': 'auto'})
    result = bench_step(cfg, device='cpu', steps=1, batch=2, text_tokens=20)
    assert result['gradient_checkpointing'] == dict(llm=0, vision=False)  # tiny: fits as is


def test_train_plain_trains_and_scores_without_the_runner(tmp_path):
    """tools/train_plain.py (for the GPU machine, which has no XTuner or DeepSpeed): the
    config's optimizer with its lr multipliers and schedule, the loss falls, the deadline
    stops it early, and the result is the demo's scoring of what was trained."""
    from mllm.datasets.synthetic import generate_synthetic_vqa
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = tmp_path / 'data'
    generate_synthetic_vqa(str(data), num_train=256, num_val=20)
    config = tmp_path / 'lr3.py'
    config.write_text(f"_base_ = ['{repo}/configs/tiny/tiny_llava_synthetic.py']\n"
                      "optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'projector': "
                      "dict(lr_mult=3.0)}))\n")
    out = tmp_path / 'result.json'
    result = subprocess.run(
        [sys.executable, os.path.join(repo, 'tools', 'train_plain.py'), str(config), '--data-dir',
         str(data), '--out', str(out), '--device', 'cpu', '--num-workers', '0',
         '--log-interval', '5', '--cfg-options', 'train_cfg.max_iters=30'],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['steps'] == 30 and r['max_iters'] == 30
    assert r['lr_mults'] == {'projector': 3.0}
    assert r['losses'][-1] < 0.85 * r['losses'][0]  # last 5 steps' mean vs the first 5's (warm-up)
    assert set(r['per_category']) == {'colour', 'shape', 'position', 'count', 'fine_detail'}
    assert 0 <= r['accuracy'] <= 1 and not os.path.exists(tmp_path / 'result.pth')
    # the deadline stops training early and still scores
    result = subprocess.run(
        [sys.executable, os.path.join(repo, 'tools', 'train_plain.py'), str(config), '--data-dir',
         str(data), '--out', str(out), '--device', 'cpu', '--num-workers', '0',
         '--deadline', '0'], cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['steps'] == 1 and r['max_iters'] == 600 and 'accuracy' in r


IMAGE_FILTER = '''
# only the GPU image's packages (and the kit's wheels) can be imported: the others are hidden
import json, sys
from importlib.machinery import PathFinder
_allowed = set(json.load(open(__file__.replace('sitecustomize.py', 'allowed.json'))))
_std = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
class _ImageOnly(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if '.' not in name and not (name in _allowed or name in _std or name.startswith('_')):
            return None
        return PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [_ImageOnly if f is PathFinder else f for f in sys.meta_path]
'''


def test_bench_gpu_imports_only_what_the_gpu_image_has(tmp_path):
    """The GPU machine has torch and transformers but no mmengine, XTuner or DeepSpeed; the
    kit carries tools/gpu_wheels.sh's wheels. With every other package hidden (the image's
    list: tests/fixtures/gpu_image_packages.txt), `mllm bench gpu` still runs."""
    import importlib.metadata as md
    import re
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def norm(name):
        return re.sub(r'[-_.]+', '-', name.lower())

    with open(os.path.join(repo, 'tests', 'fixtures', 'gpu_image_packages.txt')) as f:
        image = {norm(line.strip()) for line in f if line.strip() and not line.startswith('#')}
    with open(os.path.join(repo, 'tools', 'gpu_wheels.sh')) as f:
        wheels = {norm(p) for p in re.search(r'PACKAGES=\(([^)]*)\)', f.read()).group(1).split()}
    assert 'mmengine' in wheels and 'mmengine' not in image and 'xtuner' not in image
    # the image's packages bring their own dependencies (its huggingface_hub 1.33 needs httpx,
    # ours httpx2): the closure of what they require here counts as there
    installed = {norm(d.metadata['Name']): d for d in md.distributions()}
    names, todo = set(), [n for n in image | wheels if n in installed]
    while todo:
        name = todo.pop()
        if name in names:
            continue
        names.add(name)
        for req in installed[name].requires or []:
            dep = norm(re.match(r'[A-Za-z0-9._-]+', req).group(0))
            if 'extra ==' not in req and dep in installed:
                todo.append(dep)
    allowed = {'mllm', 'cv2'}  # cv2: opencv-python here, opencv-python-headless there
    for dist in installed.values():
        if norm(dist.metadata['Name']) in names:
            top = (dist.read_text('top_level.txt') or '').split() or {
                f.parts[0].split('.')[0] for f in dist.files or []
                if not f.parts[0].endswith(('.dist-info', '.egg-info'))}
            allowed |= set(top)
    assert not {'xtuner', 'deepspeed', 'bitsandbytes', 'datasets'} & allowed
    (tmp_path / 'allowed.json').write_text(json.dumps(sorted(allowed)))
    (tmp_path / 'sitecustomize.py').write_text(IMAGE_FILTER)
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{repo}')
    probe = subprocess.run([sys.executable, '-c', 'import xtuner'], env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0  # the filter is in force
    out = subprocess.run([sys.executable, '-m', 'mllm', 'bench', 'gpu', '--tiny', '--steps', '1',
                          '--json'], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {'xtuner_way', 'mllm'} <= set(result['variants'])
    assert all('error' not in v for v in result['variants'].values())


def test_datasheet_peaks_for_the_a100_projection():
    """bench step projects A100 hours at the device's MFU against its own datasheet."""
    from mllm.bench.benchmark import datasheet_bf16_peak
    assert datasheet_bf16_peak('NVIDIA A100-SXM4-80GB') == 312e12
    assert datasheet_bf16_peak('NVIDIA H100 PCIe') == 756e12
    assert datasheet_bf16_peak('NVIDIA H100 80GB HBM3') == 989e12
    assert datasheet_bf16_peak('NVIDIA H200') == 989e12
    assert datasheet_bf16_peak('cpu') is None
