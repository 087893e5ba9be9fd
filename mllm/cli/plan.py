"""``mllm plan CONFIG --gpus 8 --gpu-mem 80``: per-GPU memory under each ZeRO stage, the
recompute policy that fits it (``gradient_checkpointing='auto'``: how many LLM layers to
checkpoint), whether it fits, and the stage to use (formulas: ``mllm.bench.memory``)."""
import json
import os

from mmengine.config import DictAction

# table rows: (report key, column title)
COLUMNS = (('weights', 'weights'), ('gradients', 'grads'), ('optimizer', 'optim'),
           ('working_set', 'gathered'), ('activations_gb', 'activ.'), ('logits_gb', 'logits'),
           ('memory_gb', 'total'))


def _positive_int(text: str) -> int:
    import argparse
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _positive_float(text: str) -> float:
    import argparse
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {value}')
    return value


def add_arguments(parser):
    parser.add_argument('config')
    parser.add_argument('--gpus', type=_positive_int, default=8,
                        help='data-parallel GPUs (default 8)')
    parser.add_argument('--gpu-mem', type=_positive_float, default=80.0,
                        help='GB per GPU (default 80)')
    parser.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16')
    parser.add_argument('--seq-len', type=_positive_int, help='every sample this many tokens '
                        "(default: the data's lengths from --lengths, else the dataset's "
                        'max_length)')
    parser.add_argument('--micro-batch', type=_positive_int,
                        help="samples per GPU step (default: the config's batch_size)")
    parser.add_argument('--lengths', help='the data\'s real lengths: a token cache folder '
                        '(<token_cache>/<key>, written on the first training run), or "config": '
                        "the config's own cache when it exists")
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def print_table(report: dict) -> None:
    print(f'{report["params"] / 1e9:.2f} B parameters, {report["trainable_params"] / 1e9:.2f} B '
          f'trainable; {report["gpus"]} GPUs x {report["gpu_mem_gb"]:g} GB, {report["precision"]}; '
          f'micro-batch {report["batch_per_gpu"]}: {report["tokens_per_micro_batch"]} tokens '
          f'({"padding-free" if report["padding_free"] else "padded"}), '
          f'{report["learned_per_micro_batch"]} learned '
          f'({"answer-only head" if report["answer_only_head"] else "full-vocab logits"}); '
          f'lengths: {report["lengths_from"]}; gradient checkpointing '
          f'{report["gradient_checkpointing"]!r}')
    print(f'{"stage":<15}' + ''.join(f'{title:>9}' for _, title in COLUMNS)
          + f'{"ckpt":>7}{"recomp":>8}{"no ckpt":>9}{"all":>8}  fits')
    layers = report['llm_layers']
    for stage, row in report['stages'].items():
        ckpt = f'{row["checkpoint_layers"]}/{layers}' + ('+v' if row['checkpoint_vision'] else '')
        print(f'{stage:<15}' + ''.join(f'{row[key]:>9.1f}' for key, _ in COLUMNS)
              + f'{ckpt:>7}{100 * row["recompute_share"]:>7.0f}%'
              + f'{row["memory_gb_without_checkpointing"]:>9.1f}'
              + f'{row["memory_gb_with_checkpointing"]:>8.1f}  {"yes" if row["fits"] else "no"}')
    print(f'GB per GPU; total = the parts + {report["overhead_gb"]:g} GB CUDA context/'
          f'fragmentation. ckpt: LLM layers checkpointed (+v: the vision tower), recomp: '
          f'recompute share of the step; zero3_offload needs ~{report["offload_cpu_gb"]:g} GB '
          f'of CPU memory in all')
    cheapest, recommended = report['cheapest'], report['recommended']
    if cheapest:
        print(f'cheapest stage that fits: {cheapest}; recommended: {recommended} '
              '(least recompute at the data-parallel communication volume)')
        row = report['stages'][recommended]
        if 'per_batch' in row:
            print(f"ckpt is for the worst micro-batch; in training each micro-batch checkpoints "
                  f"what its own tokens need within the {row['per_batch']['room_gb']:.1f} GB "
                  f"it leaves for the LLM's activations ({recommended}; "
                  f"{row['per_batch']['kept']:,.0f} B per token in a kept layer)")
    else:
        print('no stage fits: lower the per-GPU batch, enable gradient checkpointing or add GPUs')


def _lengths(spec, cfg):
    if spec is None:
        return None
    from mllm.bench.memory import data_lengths
    from mllm.datasets.token_cache import TokenCache, sample_lengths
    if spec == 'config':
        lengths = data_lengths(cfg)
        if lengths is None:
            dataset = cfg.train_dataloader.dataset
            raise FileNotFoundError(
                f'--lengths config: no token cache of {dataset.get("data_path")} under '
                f'{dataset.get("token_cache")!r} yet (the first training run, or '
                'LLaVADataset(token_cache=...), builds it)')
        return lengths
    if not os.path.isfile(os.path.join(spec, 'offsets.npy')):
        raise FileNotFoundError(f'--lengths {spec}: not a token cache folder (no offsets.npy)')
    return sample_lengths(TokenCache(spec))


def run(args) -> int:
    from mllm.bench.memory import plan_memory
    from mllm.engine.config import load_config

    cfg = load_config(args.config, args.cfg_options)
    report = plan_memory(cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem,
                         precision=args.precision, seq_len=args.seq_len,
                         lengths=_lengths(args.lengths, cfg), micro_batch=args.micro_batch)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0
