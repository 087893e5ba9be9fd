"""``mllm train CONFIG``: one process, or N processes through torchrun (NPROC_PER_NODE=N)."""
import argparse
import os
import subprocess
import sys

from mmengine.config import DictAction


def add_arguments(parser):
    parser.add_argument('config', help='config file, or a shipped config name')
    parser.add_argument('--work-dir', help='defaults to work_dirs/<config name>')
    parser.add_argument('--deepspeed', help="zero1 | zero2 | zero3 | zero3_offload | a JSON path | "
                        "'none' (default: the config's `deepspeed` key, if any)")
    parser.add_argument('--resume', help="'auto' (newest checkpoint of the work dir) or a path")
    parser.add_argument('--load-from', help='start from these weights (e.g. the previous '
                        "stage's checkpoint) without resuming its optimizer and schedule")
    parser.add_argument('--trust-checkpoint', action='append', default=[], metavar='PATH',
                        help='load this third-party checkpoint file (or folder) even if it needs '
                        "torch's full unpickler, which can run code stored in it (repeatable)")
    parser.add_argument('--seed', type=int)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys: key=value ...')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help=argparse.SUPPRESS)  # set by the torchrun re-launch


def _env(*names: str, default) -> str:
    """The first of ``names`` set in the environment (ours, torchrun's, then Slurm's)."""
    return next((os.environ[n] for n in names if os.environ.get(n)), str(default))


def launch_torchrun(nproc: int) -> int:
    """Re-run this command under torchrun. Multi-node settings come from the environment:
    NNODES, NODE_RANK, ADDR (or MASTER_ADDR), PORT (or MASTER_PORT); under Slurm, NNODES
    and NODE_RANK default to SLURM_NNODES and SLURM_NODEID (one `srun` task per node).
    torchrun runs through ``mllm.engine.torchrun``, whose rendezvous store listens on ADDR
    only (torch's own store listens on every interface)."""
    cmd = [sys.executable, '-m', 'mllm.engine.torchrun', f'--nproc_per_node={nproc}',
           f'--nnodes={_env("NNODES", "SLURM_NNODES", default=1)}',
           f'--node_rank={_env("NODE_RANK", "SLURM_NODEID", default=0)}',
           f'--master_addr={_env("ADDR", "MASTER_ADDR", default="127.0.0.1")}',
           f'--master_port={_env("PORT", "MASTER_PORT", default=29500)}',
           '-m', 'mllm', *sys.argv[1:], '--launcher', 'pytorch']
    return subprocess.run(cmd).returncode


def run(args) -> int:
    nproc = int(os.environ.get('NPROC_PER_NODE', 1))
    nnodes = int(_env('NNODES', 'SLURM_NNODES', default=1))
    if (nproc > 1 or nnodes > 1) and args.launcher == 'none':
        return launch_torchrun(nproc)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing downloads at run time
    from mllm.bench.memory import resolve_auto_checkpointing
    from mllm.engine.checkpoint import trust_checkpoint
    from mllm.engine.config import load_config, find_config
    from mllm.engine.runner import build_runner

    for path in args.trust_checkpoint:
        trust_checkpoint(path)
    config = find_config(args.config)
    cfg = load_config(config, args.cfg_options)
    work_dir = args.work_dir or cfg.get('work_dir') or os.path.join(
        'work_dirs', os.path.splitext(os.path.basename(config))[0])
    # a recipe may name its intended DeepSpeed config (`deepspeed = 'zero2'`); 'none' opts out
    deepspeed = args.deepspeed or cfg.get('deepspeed')
    deepspeed = None if deepspeed == 'none' else deepspeed
    runner = build_runner(cfg, work_dir=work_dir, launcher=args.launcher, resume=args.resume,
                          load_from=args.load_from, seed=args.seed, deepspeed=deepspeed,
                          plan_checkpointing=resolve_auto_checkpointing)
    runner.train()
    return 0
