"""``mllm sweep``: grid expansion, members equal to hand-written swaps, pre-flight (memory,
data), a sweep killed during its second member resuming without redoing the first, the
report, Slurm scripts and --status."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mllm.cli import main
from mllm.sweep import sweep as sweeps
from mllm.engine.config import CONFIG_ROOT, load_config

REPO = os.path.dirname(CONFIG_ROOT)
LAUNCH_GLOB = '[0-9]' * 8 + '_' + '[0-9]' * 6


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    out = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_vqa(out, num_train=32, num_val=8)
    return out


def tiny_sets(data_dir, data_path=None, max_iters=12):
    """--set values for a fast tiny member: 12 steps of batch 4, a checkpoint every 6."""
    return [f'train_dataloader.dataset.data_path={data_path or data_dir + "/train.json"}',
            f'train_dataloader.dataset.image_folder={data_dir}/images',
            f'tokenizer.pretrained={data_dir}/tokenizer', 'train_dataloader.batch_size=4',
            f'train_cfg.max_iters={max_iters}', 'default_hooks.checkpoint.interval=6',
            'default_hooks.logger.interval=1']


# ----------------------------------------------------------------------------- grid, configs

def test_sets_parse_like_cfg_options_and_expand_to_a_grid():
    sets = sweeps.parse_sets(['optim_wrapper.optimizer.lr=1e-4,2e-4', 'train_cfg.max_iters=20',
                              'model.gradient_checkpointing=false'])
    assert sets == {'optim_wrapper.optimizer.lr': [1e-4, 2e-4], 'train_cfg.max_iters': [20],
                    'model.gradient_checkpointing': [False]}
    grid = sweeps.expand_grid(['vicuna7b', 'llama3_8b'], sets)
    assert [(llm, s['optim_wrapper.optimizer.lr']) for llm, s in grid] == [
        ('vicuna7b', 1e-4), ('vicuna7b', 2e-4), ('llama3_8b', 1e-4), ('llama3_8b', 2e-4)]
    assert all(s['train_cfg.max_iters'] == 20 for _, s in grid)
    assert sweeps.member_name('vicuna7b', grid[1][1], ['optim_wrapper.optimizer.lr']) \
        == 'vicuna7b_lr0.0002'
    for bad in ('lr', 'param_scheduler.1.end=5', 'a='):
        with pytest.raises(ValueError):
            sweeps.parse_sets([bad])


@pytest.mark.parametrize('recipe,llm,shipped', [
    ('llava15_finetune', 'llama3_8b', 'llava15/llava15_llama3_8b_finetune.py'),
    ('llava15_finetune', 'phi3_mini', 'llava15/llava15_phi3_mini_finetune.py'),
    ('mgllava_finetune', 'phi3_mini', 'mgllava/mgllava_phi3_mini_finetune.py'),
])
def test_member_prints_the_same_config_as_the_shipped_swap(tmp_path, capsys, recipe, llm,
                                                           shipped):
    [member] = sweeps.create_sweep(str(tmp_path), recipe, [llm], {}, {})
    printed = []
    for config in (member.config, os.path.join(CONFIG_ROOT, shipped)):
        assert main(['print-config', config]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]


def test_member_with_set_values_equals_swap_with_cfg_options(tmp_path):
    members = sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna7b'],
                                  {'optim_wrapper.optimizer.lr': [1e-5, 2e-5]}, {})
    assert [m.name for m in members] == ['vicuna7b_lr1e-05', 'vicuna7b_lr2e-05']
    for member, lr in zip(members, (1e-5, 2e-5)):
        expected = load_config('llava15_vicuna7b_finetune', {'optim_wrapper.optimizer.lr': lr})
        assert load_config(member.config).to_dict() == expected.to_dict()
    # the tiny recipe family plus tiny_llama is the shipped tiny LLaVA (keys in another order)
    [tiny] = sweeps.create_sweep(str(tmp_path / 'tiny'), 'tiny_llava_synthetic', ['tiny_llama'],
                                 {}, {})
    assert load_config(tiny.config).to_dict() == load_config('tiny_llava_synthetic').to_dict()


def test_unknown_key_and_changed_member_are_refused(tmp_path):
    with pytest.raises(KeyError, match='optim_wraper'):
        sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna7b'],
                            {'optim_wraper.lr': [1]}, {})
    with pytest.raises(FileNotFoundError, match='known: .*vicuna7b'):
        sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna8b'], {}, {})
    sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna7b'], {}, {})
    (tmp_path / 'vicuna7b').mkdir()
    (tmp_path / 'vicuna7b' / 'iter_10.pth').write_bytes(b'')  # it has trained
    with pytest.raises(sweeps.SweepError, match='config changed'):
        sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna7b'],
                            {'train_dataloader.batch_size': [4]}, {})


# ----------------------------------------------------------------------------- pre-flight

def test_preflight_names_the_zero_stage_that_would_fit(tmp_path):
    members = sweeps.create_sweep(str(tmp_path), 'llava15_finetune', ['vicuna7b', 'vicuna13b'],
                                  {}, {})
    results = sweeps.preflight(members, gpus=8, gpu_mem_gb=60, deepspeed='zero2',
                               check_data=False)
    assert results['vicuna7b']['problems'] == []
    assert results['vicuna7b']['params']['total'] == 7062902784  # as `mllm inspect`
    # 13B's replicated bf16 weights and ZeRO-2 states leave no room on 60 GB (mllm plan)
    [problem] = results['vicuna13b']['problems']
    assert 'under zero2 does not fit 8 x 60 GB' in problem
    assert 'fits under zero3 (' in problem


def test_preflight_stops_a_sweep_on_bad_data_or_no_fit(tmp_path, synthetic, capsys):
    with open(os.path.join(synthetic, 'train.json')) as f:
        samples = json.load(f)
    samples[3]['image'] = 'train/missing.png'
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(samples))
    work = tmp_path / 'sweep'
    code = main(['sweep', 'tiny_llava_synthetic', '--llms', 'tiny_llama_small,tiny_llama',
                 '--work-dir', str(work), '--gpus', '1', '--gpu-mem', '2',
                 '--set', *tiny_sets(synthetic, data_path=str(bad))])
    out = capsys.readouterr()
    assert code == 1
    assert 'pre-flight failed for 2 member(s); nothing was started' in out.err
    assert out.out.count('missing.png') == 2  # each member names the bad sample
    assert 'train_000003' in out.out
    assert out.out.count('no ZeRO stage fits') == 2
    assert not (work / 'tiny_llama_small').exists()  # nothing trained
    checked = json.loads((work / 'preflight.json').read_text())
    assert checked['tiny_llama']['params']['total'] > checked['tiny_llama_small']['params']['total']


# ----------------------------------------------------------------------------- kill, resume, report

def _sweep_processes(marker: str):
    """Live processes whose command line mentions ``marker`` (this test's sweep folder)."""
    pids = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.fixture(scope='module')
def killed_sweep(tmp_path_factory, synthetic):
    """A two-member sweep SIGKILLed once its second member saved iter_6, then rerun."""
    work = tmp_path_factory.mktemp('killed') / 'sweep'
    cmd = [sys.executable, '-m', 'mllm', 'sweep', 'tiny_llava_synthetic',
           '--llms', 'tiny_llama_small,tiny_llama', '--work-dir', str(work),
           '--eval', f'synthetic:{synthetic}', '--set', *tiny_sets(synthetic)]
    log = open(work.parent / 'first.log', 'w')
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    marker, deadline = work / 'tiny_llama' / 'last_checkpoint', time.time() + 600
    while not (marker.exists() and 'iter_6' in marker.read_text()):
        assert proc.poll() is None, (work.parent / 'first.log').read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    # the training child dies with the sweep: nothing keeps writing into the work dir
    while _sweep_processes(str(work)) and time.time() < deadline:
        time.sleep(0.1)
    orphans = _sweep_processes(str(work))
    killed = dict(first_done=(work / 'tiny_llama_small' / 'done.json').read_text(),
                  first_mtime=os.path.getmtime(work / 'tiny_llama_small' / 'done.json'),
                  second_done=(work / 'tiny_llama' / 'done.json').exists(), orphans=orphans)
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    return dict(work=work, rerun=rerun, **killed)


def test_killed_sweep_resumes_without_redoing_a_finished_member(killed_sweep):
    from mllm.evaluation.curves import read_run

    work, rerun = killed_sweep['work'], killed_sweep['rerun']
    assert killed_sweep['orphans'] == []
    assert not killed_sweep['second_done']
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert '[sweep] tiny_llama_small: done, skipped' in rerun.stdout
    first, second = work / 'tiny_llama_small', work / 'tiny_llama'
    # the finished member was neither trained nor evaluated again
    assert (first / 'done.json').read_text() == killed_sweep['first_done']
    assert os.path.getmtime(first / 'done.json') == killed_sweep['first_mtime']
    assert len(glob.glob(str(first / LAUNCH_GLOB))) == 1
    assert len((first / 'sweep_launches.jsonl').read_text().splitlines()) == 1
    # the killed one resumed from its iter_6 checkpoint and finished
    launches = sorted(glob.glob(str(second / LAUNCH_GLOB)))
    assert len(launches) == 2
    with open(os.path.join(launches[1], 'vis_data', 'scalars.json')) as f:
        assert json.loads(f.readline())['step'] == 7
    assert [r['step'] for r in read_run(str(second))] == list(range(1, 13))
    assert json.loads((second / 'done.json').read_text())['checkpoint'].endswith('iter_12.pth')


def test_report_tables_every_member(killed_sweep, capsys):
    work = killed_sweep['work']
    for name in ('summary.csv', 'summary.json', 'summary.md', 'curves.png'):
        assert (work / name).stat().st_size > 0  # written at the end of the rerun
    (work / 'summary.json').unlink()
    assert main(['sweep', '--report', str(work)]) == 0
    rows = {r['member']: r for r in json.loads((work / 'summary.json').read_text())['members']}
    assert list(rows) == ['tiny_llama_small', 'tiny_llama']
    small, base = rows['tiny_llama_small'], rows['tiny_llama']
    assert base['llm_params'] > small['llm_params']
    for row in rows.values():
        assert row['state'] == 'done' and row['steps'] == 12
        assert row['trainable_params'] <= row['params']
        assert row['best_loss'] <= row['final_loss']
        assert row['tokens_per_s'] > 0 and row['peak_rss_mb'] > 100 and row['wall_s'] > 0
        assert 0 <= row['synthetic.accuracy'] <= 1 and 'synthetic.colour' in row
    with open(work / 'summary.csv') as f:
        assert [r['member'] for r in csv.DictReader(f)] == ['tiny_llama_small', 'tiny_llama']
    table = (work / 'summary.md').read_text().splitlines()
    assert table[0].startswith('| member | llm | params |') and len(table) == 4
    capsys.readouterr()
    assert main(['sweep', '--status', str(work)]) == 0
    status = capsys.readouterr().out
    assert status.count('done') == 2 and '12/12' in status


def test_member_evaluated_on_an_mllm_eval_benchmark(killed_sweep, synthetic, tmp_path):
    """``--eval pope:FILE:IMAGES`` runs `mllm eval` on the member's last checkpoint."""
    questions = tmp_path / 'pope.jsonl'
    questions.write_text(''.join(json.dumps(dict(question_id=i, image=f'val/{i:06d}.png',
                                                 text='Is there a red shape in the image?',
                                                 label='yes' if i % 2 else 'no')) + '\n'
                                 for i in range(4)))
    sweep = sweeps.load_sweep(str(killed_sweep['work']))
    member = sweep['members'][0]
    summary = sweeps.evaluate_member(member, str(killed_sweep['work'] / member.name),
                                     sweeps.parse_eval(f'pope:{questions}:{synthetic}/images'))
    assert summary['bench'] == 'pope' and summary['samples'] == 4
    assert 0 <= summary['accuracy'] <= 100


# ----------------------------------------------------------------------------- Slurm, status

def test_slurm_launcher_writes_one_script_per_member(tmp_path, capsys):
    work = tmp_path / 'sweep'
    assert main(['sweep', 'llava15_finetune', '--llms', 'vicuna7b,llama3_8b', '--launcher', 'slurm',
                 '--deepspeed', 'zero3', '--gpus', '16', '--no-data-check', '--work-dir', str(work),
                 '--sbatch-option=--partition=a100']) == 0
    scripts = sorted(glob.glob(str(work / 'slurm' / '*.sbatch')))
    assert [os.path.basename(s) for s in scripts] == ['llama3_8b.sbatch', 'vicuna7b.sbatch']
    text = open(scripts[1]).read()
    for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
                 '#SBATCH --partition=a100', 'export MASTER_PORT=29500 NPROC_PER_NODE=8',
                 f'-m mllm train {work}/configs/vicuna7b.py --work-dir {work}/vicuna7b '
                 '--resume auto --deepspeed zero3', f'-m mllm sweep --finish {work} vicuna7b'):
        assert line in text
    assert subprocess.run(['bash', '-n', scripts[1]]).returncode == 0
    assert 'sbatch ' + scripts[0] in (work / 'slurm' / 'submit_all.sh').read_text()
    capsys.readouterr()
    # --status reads the work dirs: one member has logged, the other has not started
    scalars = work / 'vicuna7b' / '20260101_000000' / 'vis_data' / 'scalars.json'
    scalars.parent.mkdir(parents=True)
    scalars.write_text(json.dumps(dict(loss=1.25, step=3, iter=3)) + '\n')
    assert main(['sweep', '--status', str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'pending' in next(line for line in lines if line.startswith('llama3_8b'))
    vicuna = next(line for line in lines if line.startswith('vicuna7b'))
    assert vicuna.split()[1:3] == ['started', '3'] and vicuna.endswith('1.2500')
