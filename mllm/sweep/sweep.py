"""Backbone sweeps (``mllm sweep``): one recipe over several LLMs and/or config values.

A sweep folder holds::

    sweep.json              the grid: recipe, LLM bases, --set values, members, settings
    configs/<member>.py     ``_base_ = [RECIPE, LLM_BASE]`` plus the member's --set values:
                            the inheritance of a hand-written two-line swap
    preflight.json          per member: parameters (meta device), data check, memory plan
    <member>/               the member's work dir (``mllm train --resume auto``)
    <member>/done.json      written once the member trained (and was evaluated): a rerun
                            skips it
    slurm/<member>.sbatch   with ``--launcher slurm``, plus ``slurm/submit_all.sh``
    summary.{csv,json,md}, curves.png   ``mllm sweep --report``

Members run one after another, each as a ``mllm train`` subprocess that dies with the
sweep (``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphan training behind and a
rerun continues: finished members are skipped, the interrupted one resumes from its newest
intact checkpoint.
"""
import csv
import ctypes
import datetime
import glob
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from mllm.engine.config import CONFIG_ROOT, find_config

SWEEP_FILE = 'sweep.json'
PREFLIGHT_FILE = 'preflight.json'
DONE_FILE = 'done.json'
LAUNCHES_FILE = 'sweep_launches.jsonl'
TRAIN_LOG = 'sweep_train.log'
RECIPE_DIR = os.path.join(CONFIG_ROOT, '_base_', 'recipes')
LLM_DIR = os.path.join(CONFIG_ROOT, '_base_', 'llms')


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message names the member and what to do."""


@dataclass
class Member:
    name: str
    config: str                      # absolute path of the generated config
    llm: Optional[str]               # LLM base name (None: the recipe's own LLM)
    settings: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the grid

def resolve_recipe(name: str) -> str:
    """A config path, a recipe family under ``configs/_base_/recipes``, or a shipped config."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    stem = name[:-3] if name.endswith('.py') else name
    if os.path.isfile(os.path.join(RECIPE_DIR, stem + '.py')):
        return os.path.join(RECIPE_DIR, stem + '.py')
    try:
        return os.path.abspath(find_config(name))
    except FileNotFoundError:
        recipes = sorted(f[:-3] for f in os.listdir(RECIPE_DIR) if f.endswith('.py'))
        raise FileNotFoundError(f'recipe not found: {name} (a file, a shipped config or one of '
                                f'{", ".join(recipes)})') from None


def resolve_llm(name: str) -> str:
    """A file, or an LLM base under ``configs/_base_/llms`` (``llama3_8b``)."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    path = os.path.join(LLM_DIR, (name[:-3] if name.endswith('.py') else name) + '.py')
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(LLM_DIR) if f.endswith('.py'))
        raise FileNotFoundError(f'LLM base not found: {name} (known: {", ".join(known)})')
    return path


def parse_value(text: str):
    """``--set`` values as ``--cfg-options`` reads them: int, float, bool, None or str."""
    from mmengine.config import DictAction
    return DictAction._parse_int_float_bool(text)


def parse_sets(items: Sequence[str]) -> Dict[str, list]:
    """``['optim_wrapper.optimizer.lr=1e-4,2e-4', ...]`` -> ``{key: [values]}``."""
    sets = {}
    for item in items or ():
        key, sep, values = item.partition('=')
        if not sep or not key or not values:
            raise ValueError(f'--set {item!r}: expected KEY=VALUE[,VALUE...]')
        if any(part.isdigit() for part in key.split('.')):
            raise ValueError(f'--set {key}: list indices cannot be written as a config file '
                             'merge; set the whole top-level key in a config of your own')
        sets[key] = [parse_value(v) for v in values.split(',')]
    return sets


def member_name(llm: Optional[str], settings: dict, varying: Sequence[str]) -> str:
    """``<llm>[_<last key part><value>...]`` over the keys that take several values."""
    parts = [llm] if llm else []
    parts += [f'{key.split(".")[-1]}{settings[key]}' for key in varying]
    name = '_'.join(str(p) for p in parts) or 'member'
    return re.sub(r'[^A-Za-z0-9_.+-]', '-', name)


def _nested(settings: dict) -> dict:
    """Dotted keys -> nested dicts, merged as a config file's keys merge into its bases."""
    tree = {}
    for key, value in settings.items():
        *parents, leaf = key.split('.')
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _literal(value) -> str:
    if isinstance(value, dict):
        return 'dict(' + ', '.join(f'{k}={_literal(v)}' for k, v in value.items()) + ')'
    return repr(value)


def member_source(recipe: str, llm: Optional[str], settings: dict) -> str:
    """The generated config: a two-line swap plus the member's ``--set`` values."""
    bases = [recipe] + ([llm] if llm else [])
    lines = ['# written by `mllm sweep`: the recipe and LLM base, as a two-line swap inherits them',
             '_base_ = [' + ', '.join(repr(b) for b in bases) + ']']
    lines += [f'{key} = {_literal(value)}' for key, value in _nested(settings).items()]
    return '\n'.join(lines) + '\n'


def expand_grid(llms: Sequence[Optional[str]], sets: Dict[str, list]) -> List[tuple]:
    """``(llm, settings)`` for every combination, LLM outermost (members of one LLM adjacent)."""
    keys = list(sets)
    return [(llm, dict(zip(keys, values)))
            for llm in llms for values in itertools.product(*(sets[k] for k in keys))]


def _top_level_keys(paths: Sequence[str]) -> set:
    from mmengine.config import Config
    return {k for path in paths for k in Config.fromfile(path).keys()}


def _has_run(work_dir: str) -> bool:
    return os.path.isfile(os.path.join(work_dir, DONE_FILE)) or bool(
        glob.glob(os.path.join(work_dir, 'iter_*.pth')))


def create_sweep(sweep_dir: str, recipe: str, llms: Sequence[str], sets: Dict[str, list],
                 settings: dict) -> List[Member]:
    """Write ``configs/<member>.py`` and ``sweep.json``. A member that already trained keeps
    its config: a different one for the same name is refused (a new --work-dir, or delete
    the member's folder)."""
    recipe_path = resolve_recipe(recipe)
    llm_paths = {name: resolve_llm(name) for name in llms}
    known = _top_level_keys([recipe_path, *llm_paths.values()])
    unknown = [k for k in sets if k.split('.')[0] not in known]
    if unknown:
        raise KeyError(f'--set {unknown[0]}: the recipe and LLM bases have no top-level key '
                       f'{unknown[0].split(".")[0]!r} (known: {", ".join(sorted(known))})')
    varying = [k for k, values in sets.items() if len(values) > 1]
    sweep_dir = os.path.abspath(sweep_dir)
    os.makedirs(os.path.join(sweep_dir, 'configs'), exist_ok=True)
    members = []
    for llm, values in expand_grid(list(llms) or [None], sets):
        name = member_name(llm, values, varying)
        path = os.path.join(sweep_dir, 'configs', name + '.py')
        source = member_source(recipe_path, llm_paths.get(llm), values)
        if os.path.isfile(path) and open(path).read() != source \
                and _has_run(os.path.join(sweep_dir, name)):
            raise SweepError(f'{name}: its config changed since it trained in '
                             f'{os.path.join(sweep_dir, name)}; use another --work-dir or '
                             'delete that folder')
        with open(path, 'w') as f:
            f.write(source)
        members.append(Member(name, path, llm, values))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f'two members share a name: {names}')
    with open(os.path.join(sweep_dir, SWEEP_FILE), 'w') as f:
        json.dump(dict(recipe=recipe_path, llms=list(llms), sets=sets, cwd=os.getcwd(),
                       members=[asdict(m) for m in members], **settings), f, indent=2)
    return members


def load_sweep(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{sweep_dir} is not a sweep folder (no {SWEEP_FILE}; '
                                'start one with `mllm sweep RECIPE --llms ...`)')
    with open(path) as f:
        sweep = json.load(f)
    sweep['members'] = [Member(**m) for m in sweep['members']]
    return sweep


# ----------------------------------------------------------------------------- pre-flight

def _data_problems(cfg, limit: int = 5) -> List[str]:
    """``mllm check-data`` on the config's training data, its tokenizer and template."""
    from mllm.datasets.checks import sample_problems
    from mllm.datasets.llava import DataError
    from mllm.registry import DATASETS

    dataset_cfg = cfg.train_dataloader.dataset.copy()
    dataset_cfg['strict'] = False
    try:
        dataset = DATASETS.build(dataset_cfg)
    except (DataError, OSError, ValueError) as err:  # the file, or the tokenizer, is unusable
        return [f'data: {err}']
    problems = [f'data: {dataset.describe(i)}: {p}' for i, p in sample_problems(dataset)]
    if len(problems) > limit:
        problems = problems[:limit] + [f'data: ... {len(problems) - limit} more problem(s) '
                                       f'(`mllm check-data {cfg.filename}`)']
    return problems


def _data_key(cfg) -> str:
    """Members whose data, tokenizer, template and processing agree share one data check."""
    d = cfg.train_dataloader.dataset
    return hashlib.sha1(json.dumps(d.to_dict() if hasattr(d, 'to_dict') else dict(d),
                                   sort_keys=True, default=str).encode()).hexdigest()


def _fit_problems(plan: dict, stage: Optional[str]) -> List[str]:
    """The member's ZeRO stage (``none`` is checked as zero1, the closest stage
    ``mllm plan`` estimates) must fit; else name the cheapest one that does."""
    checked = stage if stage in plan['stages'] else 'zero1'
    row = plan['stages'][checked]
    if row['fits']:
        return []
    where = f'{plan["gpus"]} x {plan["gpu_mem_gb"]:g} GB GPUs'
    needed = plan['cheapest']
    return [f'memory: {row["memory_gb"]:.1f} GB per GPU under {stage or "no ZeRO"} does not fit '
            f'{where}; ' + (f'it fits under {needed} ({plan["stages"][needed]["memory_gb"]:.1f} '
                            f'GB; --deepspeed {needed})' if needed else
                            'no ZeRO stage fits (lower the batch, enable gradient checkpointing '
                            'or add GPUs)')]


def preflight(members: Sequence[Member], gpus: int = 8, gpu_mem_gb: float = 80.0,
              deepspeed: Optional[str] = None, precision: str = 'bf16',
              check_data: bool = True) -> Dict[str, dict]:
    """Per member: the config builds on the meta device (``mllm inspect``), its data passes
    ``mllm check-data`` for its tokenizer and template, and ``mllm plan`` says its stage
    fits ``gpus`` x ``gpu_mem_gb``. Returns ``{name: dict(params, trainable_params,
    cheapest, problems)}``; nothing is raised, so every member's problems are listed."""
    from mllm.bench.inspect import inspect_config
    from mllm.engine.config import load_config
    from mllm.bench.memory import plan_memory

    results, data_checks = {}, {}
    for member in members:
        result = dict(params=None, trainable_params=None, cheapest=None, problems=[])
        results[member.name] = result
        try:
            cfg = load_config(member.config)
            report = inspect_config(cfg)
        except Exception as err:  # noqa: BLE001 - any failure to build is the finding
            result['problems'].append(f'config: {type(err).__name__}: {err}')
            continue
        result.update(params=report['params'], trainable_params=report['trainable_params'])
        stage = deepspeed or cfg.get('deepspeed')
        stage = None if stage == 'none' else stage
        try:
            plan = plan_memory(cfg, gpus=gpus, gpu_mem_gb=gpu_mem_gb, precision=precision,
                               report=report)
            result.update(cheapest=plan['cheapest'], stage=stage,
                          memory_gb=plan['stages'].get(stage or 'zero1', {}).get('memory_gb'))
            result['problems'] += _fit_problems(plan, stage)
        except Exception as err:  # noqa: BLE001
            result['problems'].append(f'memory plan: {type(err).__name__}: {err}')
        if check_data:
            key = _data_key(cfg)
            if key not in data_checks:
                data_checks[key] = _data_problems(cfg)
            result['problems'] += data_checks[key]
    return results


# ----------------------------------------------------------------------------- running

def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the sweep dies (Linux), so a killed
    sweep leaves no training running in a work dir the next sweep resumes."""
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_child(cmd: List[str], log_path: str) -> tuple:
    """Run ``cmd`` with its output appended to ``log_path``; ``(exit code, peak RSS MB)``."""
    with open(log_path, 'a') as log:
        log.write(f'\n$ {" ".join(cmd)}\n')
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:  # the child got the same SIGINT: let it stop, then stop
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # KB on Linux


def last_checkpoint(work_dir: str) -> str:
    path = os.path.join(work_dir, 'last_checkpoint')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{work_dir}: no last_checkpoint (did training save one?)')
    with open(path) as f:
        return os.path.join(work_dir, f.read().strip())  # relative to the work dir


def parse_eval(spec: str) -> dict:
    """``BENCH:DATA[:IMAGE_FOLDER]``: an ``mllm eval`` benchmark, or ``synthetic:DIR`` (the
    demo's held-out questions, ``DIR/val.json``)."""
    from mllm.evaluation.benchmarks import LOADERS

    bench, _, rest = spec.partition(':')
    data, _, image_folder = rest.partition(':')
    if bench not in set(LOADERS) | {'synthetic'} or not data:
        raise ValueError(f'--eval {spec!r}: expected BENCH:DATA[:IMAGE_FOLDER] with BENCH one '
                         f'of synthetic, {", ".join(sorted(LOADERS))}')
    return dict(bench=bench, data=data, image_folder=image_folder or None)


def evaluate_member(member: Member, work_dir: str, spec: dict) -> dict:
    """Scores of the member's last checkpoint; ``<work_dir>/eval/<bench>/summary.json``."""
    out = os.path.join(work_dir, 'eval', spec['bench'])
    os.makedirs(out, exist_ok=True)
    checkpoint = last_checkpoint(work_dir)
    if spec['bench'] == 'synthetic':
        from mllm.evaluation.synthetic import score_synthetic
        from mllm.engine.config import load_config
        scores = score_synthetic(load_config(member.config), checkpoint, spec['data'], False,
                                 os.path.join(out, 'predictions.jsonl'))
        with open(os.path.join(out, 'summary.json'), 'w') as f:
            json.dump(dict(bench='synthetic', data=spec['data'], **scores), f, indent=2)
    else:
        cmd = [sys.executable, '-m', 'mllm', 'eval', member.config, '--checkpoint', checkpoint,
               '--bench', spec['bench'], '--data', spec['data'], '--out', out]
        cmd += ['--image-folder', spec['image_folder']] if spec['image_folder'] else []
        code, _ = run_child(cmd, os.path.join(work_dir, TRAIN_LOG))
        if code:
            raise SweepError(f'{member.name}: mllm eval exited {code}; log in '
                             f'{os.path.join(work_dir, TRAIN_LOG)}')
    with open(os.path.join(out, 'summary.json')) as f:
        return json.load(f)


def _atomic_json(path: str, data) -> None:
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=2)
    os.replace(path + '.tmp', path)


def finish_member(sweep: dict, member: Member, sweep_dir: str) -> dict:
    """After a successful training: evaluate, then write ``done.json`` (last, so a member
    without it trains (resumes) and evaluates again on the next run)."""
    work_dir = os.path.join(sweep_dir, member.name)
    scores = {spec['bench']: evaluate_member(member, work_dir, spec)
              for spec in map(parse_eval, sweep.get('eval') or [])}
    done = dict(member=member.name, checkpoint=last_checkpoint(work_dir), eval=scores,
                finished=datetime.datetime.now().isoformat(timespec='seconds'))
    _atomic_json(os.path.join(work_dir, DONE_FILE), done)
    return done


def train_command(member: Member, sweep_dir: str, deepspeed: Optional[str],
                  python: str = sys.executable) -> List[str]:
    cmd = [python, '-m', 'mllm', 'train', member.config, '--work-dir',
           os.path.join(sweep_dir, member.name), '--resume', 'auto']
    return cmd + (['--deepspeed', deepspeed] if deepspeed else [])


def run_local(sweep_dir: str, log=print) -> List[str]:
    """Train every member that has no ``done.json`` yet, one after another; returns the
    names trained. A failure stops the sweep (a rerun resumes that member)."""
    sweep = load_sweep(sweep_dir)
    trained = []
    for member in sweep['members']:
        work_dir = os.path.join(sweep_dir, member.name)
        if os.path.isfile(os.path.join(work_dir, DONE_FILE)):
            log(f'[sweep] {member.name}: done, skipped')
            continue
        os.makedirs(work_dir, exist_ok=True)
        cmd = train_command(member, sweep_dir, sweep.get('deepspeed'))
        log(f'[sweep] {member.name}: {" ".join(cmd[2:])}')
        start = time.time()
        code, peak_rss_mb = run_child(cmd, os.path.join(work_dir, TRAIN_LOG))
        with open(os.path.join(work_dir, LAUNCHES_FILE), 'a') as f:
            f.write(json.dumps(dict(seconds=round(time.time() - start, 1), exit=code,
                                    peak_rss_mb=round(peak_rss_mb, 1))) + '\n')
        if code:
            raise SweepError(f'{member.name}: mllm train exited {code}; log in '
                             f'{os.path.join(work_dir, TRAIN_LOG)} (a rerun resumes it)')
        finish_member(sweep, member, sweep_dir)
        log(f'[sweep] {member.name}: done in {time.time() - start:.0f} s')
        trained.append(member.name)
    return trained


SBATCH = '''#!/bin/bash
# {member} of the sweep in {sweep_dir}, written by `mllm sweep --launcher slurm`.
# Requeue-safe: --resume auto continues from the newest intact checkpoint.
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1        # one launcher per node; it starts the {per_node} ranks
#SBATCH --gpus-per-node={per_node}
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={work_dir}/slurm-%j.out
{extra}set -e
cd {cwd}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=29500 NPROC_PER_NODE={per_node}
srun {train}
# evaluation (if the sweep has --eval) and done.json, which `mllm sweep --status` reads
{python} -m mllm sweep --finish {sweep_dir} {member}
'''


def write_slurm(sweep_dir: str, gpus_per_node: int = 8, cpus_per_task: int = 64,
                sbatch_options: Sequence[str] = ()) -> List[str]:
    """One sbatch script per member that is not done, plus ``slurm/submit_all.sh``."""
    sweep = load_sweep(sweep_dir)
    gpus = sweep.get('gpus', 8)
    if gpus % gpus_per_node and gpus > gpus_per_node:
        raise ValueError(f'--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}')
    per_node = min(gpus, gpus_per_node)
    out_dir = os.path.join(sweep_dir, 'slurm')
    os.makedirs(out_dir, exist_ok=True)
    extra = ''.join(f'#SBATCH {o}\n' for o in sbatch_options)
    scripts = []
    for member in sweep['members']:
        work_dir = os.path.join(sweep_dir, member.name)
        if os.path.isfile(os.path.join(work_dir, DONE_FILE)):
            continue
        os.makedirs(work_dir, exist_ok=True)  # Slurm does not create the --output folder
        path = os.path.join(out_dir, member.name + '.sbatch')
        train = ' '.join(train_command(member, sweep_dir, sweep.get('deepspeed')))
        with open(path, 'w') as f:
            f.write(SBATCH.format(member=member.name, sweep_dir=sweep_dir, work_dir=work_dir,
                                  job=f'sweep-{member.name}', nodes=-(-gpus // per_node),
                                  per_node=per_node, cpus=cpus_per_task, extra=extra,
                                  cwd=sweep['cwd'], train=train, python=sys.executable))
        scripts.append(path)
    with open(os.path.join(out_dir, 'submit_all.sh'), 'w') as f:
        f.write('#!/bin/bash\nset -e\n' + ''.join(f'sbatch {p}\n' for p in scripts))
    return scripts


# ----------------------------------------------------------------------------- status, report

def _max_iters(member: Member) -> Optional[int]:
    from mmengine.config import Config
    try:
        return Config.fromfile(member.config).train_cfg.get('max_iters')
    except Exception:  # noqa: BLE001 - status must not fail on one member
        return None


def member_status(sweep_dir: str, member: Member) -> dict:
    from mllm.evaluation.curves import read_run

    work_dir = os.path.join(sweep_dir, member.name)
    checkpoints = sorted(int(m.group(1)) for p in glob.glob(os.path.join(work_dir, 'iter_*.pth'))
                         if (m := re.search(r'iter_(\d+)\.pth$', p)))
    try:
        records = read_run(work_dir)
    except FileNotFoundError:
        records = []
    losses = [r for r in records if 'loss' in r]
    done = os.path.isfile(os.path.join(work_dir, DONE_FILE))
    state = 'done' if done else 'started' if (records or checkpoints) else 'pending'
    return dict(member=member.name, state=state, step=records[-1]['step'] if records else 0,
                max_iters=_max_iters(member), checkpoint=checkpoints[-1] if checkpoints else None,
                loss=losses[-1]['loss'] if losses else None)


def _launch_seconds(work_dir: str) -> Optional[float]:
    """Training wall time: per launch, from its timestamp folder's name (its start) to its
    last written log file, summed over launches (killed launches count up to their last
    log line)."""
    total = None
    for launch in glob.glob(os.path.join(work_dir, '[0-9]' * 8 + '_' + '[0-9]' * 6)):
        start = time.mktime(time.strptime(os.path.basename(launch), '%Y%m%d_%H%M%S'))
        files = [p for p in glob.glob(os.path.join(launch, '**'), recursive=True)
                 if os.path.isfile(p)]
        if files:
            total = (total or 0.0) + max(0.0, max(map(os.path.getmtime, files)) - start)
    return total


def _median(values: List[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _peak_rss_mb(work_dir: str) -> Optional[float]:
    """PeakMemoryHook's file if the config has the hook, else the sweep's own measurement
    of the training processes (``ru_maxrss``)."""
    path = os.path.join(work_dir, 'peak_memory_rank0.json')
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)['peak_rss_mb']
    path = os.path.join(work_dir, LAUNCHES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        peaks = [json.loads(line).get('peak_rss_mb') for line in f if line.strip()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _flat_scores(scores: dict) -> dict:
    """``{bench: summary}`` -> ``{'bench.metric': number}`` (nested dicts joined by dots;
    ``per_category`` left out of the names)."""
    flat = {}
    skip = {'samples', 'checkpoint'}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in skip:
                    walk(prefix if k == 'per_category' else f'{prefix}.{k}', v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = round(float(value), 4)
    for bench, summary in scores.items():
        walk(bench, summary)
    return flat


def member_row(sweep_dir: str, member: Member, preflight_result: Optional[dict],
               varying: Optional[Sequence[str]] = None) -> dict:
    """One report row; of the ``--set`` keys only those in ``varying`` (default: all)."""
    from mllm.evaluation.curves import read_run

    work_dir = os.path.join(sweep_dir, member.name)
    if preflight_result is None or preflight_result.get('params') is None:
        preflight_result = preflight([member], check_data=False)[member.name]
    params = preflight_result.get('params') or {}
    shown = {k: v for k, v in member.settings.items() if varying is None or k in varying}
    row = dict(member=member.name, llm=member.llm, **shown,
               params=params.get('total'), llm_params=params.get('llm'),
               trainable_params=preflight_result.get('trainable_params'))
    try:
        records = read_run(work_dir)
    except FileNotFoundError:
        records = []
    losses = [r['loss'] for r in records if 'loss' in r]
    throughput = [r['tokens_per_s'] for r in records if 'tokens_per_s' in r]
    gpu_mem = [r['memory'] for r in records if 'memory' in r]  # MMEngine's, on CUDA (MB)
    done_path = os.path.join(work_dir, DONE_FILE)
    done = json.load(open(done_path)) if os.path.isfile(done_path) else {}
    wall = _launch_seconds(work_dir)
    row.update(state='done' if done else 'started' if records else 'pending',
               steps=records[-1]['step'] if records else 0,
               final_loss=round(losses[-1], 4) if losses else None,
               best_loss=round(min(losses), 4) if losses else None,
               tokens_per_s=round(_median(throughput), 1) if throughput else None,
               peak_gpu_mem_mb=max(gpu_mem) if gpu_mem else None,
               peak_rss_mb=_peak_rss_mb(work_dir),
               wall_s=round(wall, 1) if wall is not None else None,
               **_flat_scores(done.get('eval') or {}))
    return row


def _fmt(value) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.4g}' if abs(value) < 1000 else f'{value:,.0f}'
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f'{value / 1e6:,.2f} M' if value < 1e9 else f'{value / 1e9:,.2f} B'
    return str(value)


def markdown_table(rows: List[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(_fmt(row.get(c)) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_report(sweep_dir: str) -> dict:
    """``summary.csv``, ``summary.json``, ``summary.md`` and ``curves.png`` (the loss curves
    of every member that logged, drawn by ``mllm plot``'s code)."""
    from mllm.evaluation.curves import plot_runs, read_run

    sweep = load_sweep(sweep_dir)
    checked = {}
    if os.path.isfile(os.path.join(sweep_dir, PREFLIGHT_FILE)):
        with open(os.path.join(sweep_dir, PREFLIGHT_FILE)) as f:
            checked = json.load(f)
    varying = [k for k, values in sweep['sets'].items() if len(values) > 1]
    rows = [member_row(sweep_dir, m, checked.get(m.name), varying) for m in sweep['members']]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths = {k: os.path.join(sweep_dir, f'summary.{k}') for k in ('csv', 'json', 'md')}
    with open(paths['csv'], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths['json'], 'w') as f:
        json.dump(dict(recipe=sweep['recipe'], members=rows), f, indent=2)
    with open(paths['md'], 'w') as f:
        f.write(markdown_table(rows))
    runs = {}
    for member in sweep['members']:
        try:
            runs[member.name] = [dict(step=r['step'], loss=r['loss'])
                                 for r in read_run(os.path.join(sweep_dir, member.name))
                                 if 'loss' in r]
        except FileNotFoundError:
            continue
    if any(runs.values()):
        paths['png'] = os.path.join(sweep_dir, 'curves.png')
        plot_runs({k: v for k, v in runs.items() if v}, paths['png'])
    return dict(rows=rows, paths=paths)
