"""``mllm demo``: prove that the tiny LLaVA learns to use the image.

Generates the synthetic set, trains the tiny LLaVA, trains the same model for the same
steps on blanked images (the blind baseline), answers the held-out questions with both
(blind: blank images) and prints a table; ``<work-dir>/results.json`` keeps the figures.
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import List, Optional

DEMO_CONFIG = 'configs/tiny/tiny_llava_synthetic.py'
# model name -> (config, blank images); `--models` picks among them, the default stays as it was
DEMO_MODELS = {
    'tiny_llava': (DEMO_CONFIG, False),
    'blind': (DEMO_CONFIG, True),
    # 256-px ConvNeXt, stride 32: the same 64 visual tokens as the 64-px tiny LLaVA (opt-in)
    'tiny_convllava': ('configs/tiny/tiny_convllava_synthetic.py', False),
    # native-resolution 4x4 slices of 64 px + overview, 4 resampled tokens each: 68 tokens (opt-in)
    'tiny_uhd': ('configs/tiny/tiny_uhd_synthetic.py', False),
    # 64-px ViT + 256-px ConvNeXt fused on the same 64-token grid, + 1 token per box (opt-in)
    'tiny_mgllava': ('configs/tiny/tiny_mgllava_synthetic.py', False),
}


def data_options(name: str, data_dir: str) -> dict:
    """Dataset paths of the demo's synthetic set, for model ``name``'s config."""
    return synthetic_data_options(DEMO_MODELS[name][0], data_dir)


def synthetic_data_options(config_path: str, data_dir: str) -> dict:
    """Dataset paths of the synthetic set in ``data_dir``, for the config at ``config_path``."""
    from mmengine.config import Config

    options = {'train_dataloader.dataset.data_path': f'{data_dir}/train.json',
               'train_dataloader.dataset.image_folder': f'{data_dir}/images',
               'tokenizer.pretrained': f'{data_dir}/tokenizer'}
    if Config.fromfile(config_path).train_dataloader.dataset.get('box_file'):
        options['train_dataloader.dataset.box_file'] = f'{data_dir}/boxes.json'
    return options


def schedule_options(config_path: str, max_iters: int) -> List[str]:
    """``--cfg-options`` that train for ``max_iters`` steps with the config's learning-rate
    schedule stretched to match: a scheduler that ended at the config's last step ends at the
    new one (warm-up stays as it is). Without this, ``--max-iters 1500`` on a 600-step config
    would spend the last 900 steps at the cosine's floor."""
    from mmengine.config import Config

    cfg = Config.fromfile(config_path)
    options = [f'train_cfg.max_iters={max_iters}']
    for i, scheduler in enumerate(cfg.get('param_scheduler') or []):
        # a scheduler that would begin after the last step never runs: leave it as it is
        if scheduler.get('end') == cfg.train_cfg.max_iters and scheduler.get('begin', 0) < max_iters:
            options.append(f'param_scheduler.{i}.end={max_iters}')
    return options


def add_arguments(parser):
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-dir', default='data/synthetic')
    parser.add_argument('--max-iters', type=int, help="training steps (default: the config's)")
    parser.add_argument('--num-train', type=int, default=4000)
    parser.add_argument('--num-val', type=int, default=500)
    parser.add_argument('--models', default='tiny_llava,blind',
                        help=f'comma-separated, from {",".join(DEMO_MODELS)}')


# MMEngine's training log line: "... Iter(train) [ 50/600]  ... eta: 0:01:23 ... loss: 2.3101 ..."
ITER_LINE = re.compile(r'Iter\(train\)\s*\[\s*(\d+)/(\d+)\]')


def progress_line(name: str, line: str) -> Optional[str]:
    """A one-line summary of a training log line, or None for other lines."""
    match = ITER_LINE.search(line)
    if match is None:
        return None
    fields = dict(re.findall(r'\b(eta|loss): (\S+)', line))
    return (f'[demo] {name}: step {match.group(1)}/{match.group(2)}'
            + ''.join(f'  {k} {fields[k]}' for k in ('loss', 'eta') if k in fields))


def train(name: str, args, extra_options) -> float:
    """Train through the real CLI in a subprocess, printing a line per logged step (the
    config's logger interval; ~10 lines for a shorter --max-iters); returns the wall time
    in seconds. On failure the end of the training output is shown."""
    from mmengine.config import Config

    options = [f'{k}={v}' for k, v in data_options(name, args.data_dir).items()]
    options += extra_options
    if args.max_iters:
        options += schedule_options(DEMO_MODELS[name][0], args.max_iters)
        interval = Config.fromfile(DEMO_MODELS[name][0]).default_hooks.logger.interval
        interval = max(1, min(interval, args.max_iters // 10))
        options.append(f'default_hooks.logger.interval={interval}')
    work_dir = os.path.join(args.work_dir, name)
    if os.path.isdir(work_dir):  # the demo's own output: a rerun trains afresh
        print(f'[demo] removing the previous run in {work_dir}', flush=True)
        shutil.rmtree(work_dir)
    cmd = [sys.executable, '-m', 'mllm', 'train', DEMO_MODELS[name][0],
           '--work-dir', work_dir, '--cfg-options', *options]
    print(f'[demo] training {name}: {" ".join(cmd[2:])}', flush=True)
    start = time.time()
    tail = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        for line in process.stdout:
            tail.append(line)
            summary = progress_line(name, line)
            if summary:
                print(summary, flush=True)
    if process.returncode:
        sys.stderr.write(''.join(tail))
        raise ChildProcessError(f'training {name} failed (exit {process.returncode}; its last '
                                f'lines are above); log in {work_dir}')
    seconds = time.time() - start
    print(f'[demo] {name} trained in {seconds:.0f} s', flush=True)
    return seconds


def evaluate(name: str, args, blank_images: bool) -> dict:
    from mllm.engine.config import load_config

    cfg = load_config(DEMO_MODELS[name][0], data_options(name, args.data_dir))
    work_dir = os.path.join(args.work_dir, name)
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = os.path.join(work_dir, f.read().strip())  # relative to the work dir
    from mllm.evaluation.synthetic import score_synthetic
    return score_synthetic(cfg, checkpoint, args.data_dir, blank_images,
                           os.path.join(work_dir, 'predictions.jsonl'))


def print_table(results: dict) -> None:
    rows = results['models']
    categories = list(next(iter(rows.values()))['per_category'])
    header = f'{"model":<14}{"accuracy":>9}' + ''.join(f'{c:>12}' for c in categories)
    print('\n' + header + '\n' + '-' * len(header))
    for name, r in rows.items():
        print(f'{name:<14}{r["accuracy"]:>9.3f}' +
              ''.join(f'{r["per_category"][c]:>12.3f}' for c in categories))
    if results['margin_points'] is not None:
        print(f'\nmargin over the blind baseline: {results["margin_points"]:+.1f} points '
              f'({results["val_samples"]} held-out questions)')


def run(args) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from mllm.datasets.synthetic import generate_synthetic_vqa

    start = time.time()
    generate_synthetic_vqa(args.data_dir, num_train=args.num_train, num_val=args.num_val)
    names = args.models.split(',')
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise ValueError(f'--models: unknown {unknown}; choose from {list(DEMO_MODELS)}')
    seconds = {n: train(n, args, ['train_dataloader.dataset.blank_images=True']
                        if DEMO_MODELS[n][1] else []) for n in names}
    models = {n: evaluate(n, args, blank_images=DEMO_MODELS[n][1]) for n in names}
    for name, r in models.items():
        r['train_seconds'] = round(seconds[name], 1)
    results = dict(models=models, val_samples=args.num_val,
                   margin_points=round(100 * (models['tiny_llava']['accuracy']
                                              - models['blind']['accuracy']), 1)
                   if {'tiny_llava', 'blind'} <= set(models) else None,
                   total_seconds=round(time.time() - start, 1))
    print_table(results)
    with open(os.path.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print(f'results: {os.path.join(args.work_dir, "results.json")} '
          f'({results["total_seconds"]:.0f} s)')
    from mllm.evaluation.curves import plot_runs, read_run
    curves = os.path.join(args.work_dir, 'curves.png')
    try:
        plot_runs({name: read_run(os.path.join(args.work_dir, name)) for name in models}, curves)
        print(f'training curves: {curves}')
    except (FileNotFoundError, ValueError) as err:  # too few steps to log: no curve to draw
        print(f'no training curves: {err}')
    return 0
