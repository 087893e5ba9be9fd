"""``mllm plot WORK_DIR [WORK_DIR ...] [--out PNG]``: loss, learning rate, grad norm and
tokens/s curves from MMEngine's ``<work_dir>/<timestamp>/vis_data/scalars.json``.

A work dir holds one timestamp folder per launch. They are read oldest first: a resumed
launch continues the curve, and a launch that restarts at an earlier step replaces the
steps it repeats (a fresh re-run from step 1 replaces everything before it). Several work
dirs are overlaid, one colour each, labelled with the work dir's name (backbone sweeps).
"""
import os

from mllm.evaluation.curves import plot_runs, read_run


def add_arguments(parser):
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR')
    parser.add_argument('--out', help='PNG path (default: <first WORK_DIR>/curves.png)')


def run(args) -> int:
    runs = {}
    for work_dir in args.work_dirs:
        name = os.path.basename(os.path.normpath(work_dir))
        runs[name if name not in runs else work_dir] = read_run(work_dir)
    out = args.out or os.path.join(args.work_dirs[0], 'curves.png')
    drawn = plot_runs(runs, out)
    print(f'{", ".join(drawn)} of {len(runs)} run(s) -> {out}')
    return 0
