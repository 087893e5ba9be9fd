"""``mllm plan CONFIG --gpus 8 --gpu-mem 80``: per-GPU memory under each ZeRO stage, whether
it fits, and the cheapest stage that does (formulas: ``mllm.bench.memory``)."""
import json

from mmengine.config import DictAction

# table rows: (report key, column title)
COLUMNS = (('weights', 'weights'), ('gradients', 'grads'), ('optimizer', 'optim'),
           ('working_set', 'gathered'), ('activations_gb', 'activ.'), ('memory_gb', 'total'))


def add_arguments(parser):
    parser.add_argument('config')
    parser.add_argument('--gpus', type=int, default=8, help='data-parallel GPUs (default 8)')
    parser.add_argument('--gpu-mem', type=float, default=80.0, help='GB per GPU (default 80)')
    parser.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16')
    parser.add_argument('--seq-len', type=int, help="tokens per sample (default: the dataset's "
                        'max_length)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def print_table(report: dict) -> None:
    print(f'{report["params"] / 1e9:.2f} B parameters, {report["trainable_params"] / 1e9:.2f} B '
          f'trainable; {report["gpus"]} GPUs x {report["gpu_mem_gb"]:g} GB, {report["precision"]}, '
          f'{report["batch_per_gpu"]} x {report["seq_len"]} tokens per GPU, gradient '
          f'checkpointing {"on" if report["gradient_checkpointing"] else "off"}')
    print(f'{"stage":<15}' + ''.join(f'{title:>10}' for _, title in COLUMNS)
          + f'{"no ckpt":>10}{"ckpt":>10}  fits')
    for stage, row in report['stages'].items():
        print(f'{stage:<15}' + ''.join(f'{row[key]:>10.1f}' for key, _ in COLUMNS)
              + f'{row["memory_gb_without_checkpointing"]:>10.1f}'
              + f'{row["memory_gb_with_checkpointing"]:>10.1f}  {"yes" if row["fits"] else "no"}')
    print(f'GB per GPU, including {report["overhead_gb"]:g} GB CUDA context/fragmentation; '
          f'zero3_offload needs ~{report["offload_cpu_gb"]:g} GB of CPU memory in all')
    cheapest = report['cheapest']
    print(f'cheapest stage that fits: {cheapest}' if cheapest else
          'no stage fits: lower the per-GPU batch, enable gradient checkpointing or add GPUs')


def run(args) -> int:
    from mllm.engine.config import load_config
    from mllm.bench.memory import plan_memory

    cfg = load_config(args.config, args.cfg_options)
    report = plan_memory(cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem,
                         precision=args.precision, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0
