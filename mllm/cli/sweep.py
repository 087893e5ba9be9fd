"""``mllm sweep RECIPE --llms a,b [--set key=v1,v2 ...]``: one recipe over several LLMs (and
config values), each member a generated two-line swap; pre-flight for every member, then
training one after another (``--resume auto``, finished members skipped) or one sbatch
script per member; ``--status DIR`` and ``--report DIR`` read the work dirs
(``mllm.sweep.sweep``)."""
import argparse
import json
import os
import sys


def add_arguments(parser):
    parser.add_argument('recipe', nargs='?', help='recipe family (configs/_base_/recipes/NAME), '
                        'shipped config or file; without --llms it must name its own LLM')
    parser.add_argument('--llms', help='comma-separated LLM bases (configs/_base_/llms/NAME) '
                        'or files')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=V1[,V2...]',
                        help='config keys over several values (a grid), or one value for all')
    parser.add_argument('--work-dir', help='sweep folder (default: work_dirs/sweep_<recipe>)')
    parser.add_argument('--gpus', type=int, default=8, help='GPUs per member for the memory '
                        'pre-flight (and the Slurm scripts); default 8')
    parser.add_argument('--gpu-mem', type=float, default=80.0, help='GB per GPU (default 80)')
    parser.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16')
    parser.add_argument('--deepspeed', help='ZeRO stage for every member (passed to mllm train); '
                        "default: each config's `deepspeed` key")
    parser.add_argument('--eval', action='append', default=[], metavar='BENCH:DATA[:IMAGES]',
                        help='evaluate each trained member: an `mllm eval` benchmark, or '
                        'synthetic:DIR (held-out questions of the synthetic set); repeatable')
    parser.add_argument('--launcher', choices=['local', 'slurm'], default='local')
    parser.add_argument('--gpus-per-node', type=int, default=8, help='Slurm (default 8)')
    parser.add_argument('--cpus-per-task', type=int, default=64, help='Slurm (default 64)')
    parser.add_argument('--sbatch-option', action='append', default=[], metavar='OPT',
                        help='extra #SBATCH line, e.g. --sbatch-option=--partition=a100')
    parser.add_argument('--no-data-check', action='store_true',
                        help='pre-flight without check-data (it reads every sample)')
    parser.add_argument('--dry-run', action='store_true',
                        help='write the member configs and run the pre-flight only')
    parser.add_argument('--status', metavar='DIR', help="a sweep's members: done, started, pending")
    parser.add_argument('--report', metavar='DIR', help='summary.csv/.json/.md and curves.png')
    parser.add_argument('--finish', nargs=2, metavar=('DIR', 'MEMBER'),
                        help=argparse.SUPPRESS)  # the end of a Slurm member's script


def print_preflight(results: dict) -> int:
    bad = 0
    for name, r in results.items():
        params = (r.get('params') or {}).get('total')
        size = f'{params / 1e9:.3g} B params' if params and params >= 1e8 else \
            f'{params / 1e6:.3g} M params' if params else 'not built'
        stage = f', {r["memory_gb"]:.1f} GB/GPU under {r.get("stage") or "no ZeRO"}' \
            if r.get('memory_gb') is not None else ''
        print(f'[pre-flight] {name}: {size}{stage}: ' + ('ok' if not r['problems'] else
                                                        'FAILED'))
        for problem in r['problems']:
            print(f'    {problem}')
        bad += bool(r['problems'])
    return bad


def print_status(sweep_dir: str) -> None:
    from mllm.sweep.sweep import load_sweep, member_status

    print(f'{"member":<32}{"state":<9}{"step":>12}{"checkpoint":>12}{"loss":>10}')
    for member in load_sweep(sweep_dir)['members']:
        s = member_status(sweep_dir, member)
        step = f'{s["step"]}/{s["max_iters"]}' if s['max_iters'] else str(s['step'])
        loss = f'{s["loss"]:.4f}' if s['loss'] is not None else '-'
        print(f'{s["member"]:<32}{s["state"]:<9}{step:>12}{str(s["checkpoint"] or "-"):>12}'
              f'{loss:>10}')


def start(args) -> int:
    from mllm.sweep import sweep as sweeps

    if not args.recipe:
        print('mllm sweep: give a RECIPE (or --status DIR / --report DIR)', file=sys.stderr)
        return 2
    llms = [n for n in (args.llms or '').split(',') if n]
    evals = [sweeps.parse_eval(spec) for spec in args.eval]
    missing = [e['data'] for e in evals if not os.path.exists(e['data'])]
    if missing:
        raise FileNotFoundError(f'--eval data not found: {", ".join(missing)}')
    stem = os.path.splitext(os.path.basename(args.recipe))[0]
    sweep_dir = os.path.abspath(args.work_dir or os.path.join('work_dirs', f'sweep_{stem}'))
    members = sweeps.create_sweep(sweep_dir, args.recipe, llms, sweeps.parse_sets(args.set),
                                  dict(gpus=args.gpus, gpu_mem_gb=args.gpu_mem,
                                       precision=args.precision, deepspeed=args.deepspeed,
                                       eval=args.eval, launcher=args.launcher))
    print(f'[sweep] {len(members)} member(s) in {sweep_dir}: {", ".join(m.name for m in members)}')
    results = sweeps.preflight(members, args.gpus, args.gpu_mem, args.deepspeed, args.precision,
                               check_data=not args.no_data_check)
    with open(os.path.join(sweep_dir, sweeps.PREFLIGHT_FILE), 'w') as f:
        json.dump(results, f, indent=2)
    bad = print_preflight(results)
    if bad:
        print(f'mllm sweep: pre-flight failed for {bad} member(s); nothing was started',
              file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    if args.launcher == 'slurm':
        scripts = sweeps.write_slurm(sweep_dir, args.gpus_per_node, args.cpus_per_task,
                                     args.sbatch_option)
        print(f'[sweep] {len(scripts)} sbatch script(s); submit them with\n'
              f'  bash {os.path.join(sweep_dir, "slurm", "submit_all.sh")}\n'
              f'then follow them with `mllm sweep --status {sweep_dir}`')
        return 0
    sweeps.run_local(sweep_dir, log=lambda m: print(m, flush=True))
    return report(sweep_dir)


def report(sweep_dir: str) -> int:
    from mllm.sweep.sweep import write_report

    result = write_report(sweep_dir)
    print('\n' + open(result['paths']['md']).read())
    print('written: ' + ', '.join(result['paths'].values()))
    return 0


def run(args) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing downloads at run time
    if args.status:
        print_status(args.status)
        return 0
    if args.report:
        return report(args.report)
    if args.finish:
        from mllm.sweep.sweep import finish_member, load_sweep
        sweep = load_sweep(args.finish[0])
        member = next((m for m in sweep['members'] if m.name == args.finish[1]), None)
        if member is None:
            raise KeyError(f'{args.finish[1]} is not a member of {args.finish[0]}')
        finish_member(sweep, member, os.path.abspath(args.finish[0]))
        return 0
    return start(args)
