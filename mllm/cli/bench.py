"""``mllm bench train|data|memory|scale|step``: performance figures (docs/performance.md).

train   mllm's model + data path against stock XTuner 0.2.0's LLaVA on the same tiny model,
        samples and batches, side by side in one process: tokens/s of both and the ratio.
data    images/s of the preprocessing per worker at 336-1536 px, tokenisation samples/s.
memory  peak RSS per rank of 2-process DeepSpeed runs of the tiny config per ZeRO stage,
        next to ``mllm plan``'s estimate.
scale   step time and peak memory against image resolution and LLM depth (tiny models).
step    one forward + backward of a full-size recipe on a GPU: tokens/s, TFLOP/s, MFU and
        projected 8xA100 hours (``tools/bench_gpu.sh``); ``--device cpu`` for tiny configs.
project FLOPs per sample of a recipe (meta device, no GPU) and 8xA100 hours at ``--mfu``.
gpu     LLaVA-1.5-7B shapes on one GPU: mllm (padding-free, answer-only head, planned
        recompute) against XTuner's way (padded, full logits, full recompute), MFU against
        the device's measured bf16 peak, peak memory against the plan (``tools/bench_gpu.sh``;
        ``--tiny``: the same code on the tiny config on CPU).

Timings on a shared CPU are noisy: compare only figures measured side by side in one run.
"""
import json
import os
import tempfile

MODES = ('train', 'data', 'memory', 'scale', 'step', 'project', 'gpu')


def add_arguments(parser):
    parser.add_argument('mode', choices=MODES)
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: on a shared 2-core machine more '
                        'threads mostly measure the other processes)')
    parser.add_argument('--work-dir', help='where generated data and checkpoints go '
                        '(default: a temporary folder)')
    parser.add_argument('--steps', type=int, help='train: steps per path (default 30); '
                        'step: timed steps (default 3); memory: iterations (default 4)')
    parser.add_argument('--batch-size', type=int, help='train: samples per batch (default 16); '
                        "step: per-device batch (default: the config's)")
    parser.add_argument('--rounds', type=int, default=2,
                        help='gpu: timing rounds, every other one in reverse order; each '
                        "variant keeps its best (default 2)")
    parser.add_argument('--llm-layers', type=int, help='train: tiny LLM depth (default 2)')
    parser.add_argument('--sampler', choices=['grouped', 'random'], default='grouped',
                        help="train: XTuner's finetune sampler (length-grouped, default) or "
                        'its pretrain sampler (random batches)')
    parser.add_argument('--full-last-layer', action='store_true',
                        help="train: mllm runs HF's full last decoder layer (answer_only_last_layer"
                        '=False), to see what running its MLP at learned positions only saves')
    parser.add_argument('--samples', type=int,
                        help='train: size of the generated data set (default 512)')
    parser.add_argument('--preset', choices=['tiny', '7b-like', 'cpu'],
                        help="train: model proportions, data size and steps of "
                        "mllm.bench.benchmark.BENCH_PRESETS ('7b-like': vocabulary 32,000, "
                        "32 layers, LM head < 5%% of the FLOPs, 4096 samples; 'cpu': the same "
                        'head share at 8 layers); --steps/--samples/--llm-layers still override')
    parser.add_argument('--checkpointing', action='store_true',
                        help="train: XTuner with its configs' activation checkpointing against "
                        "mllm's planned policy (on in the 7b-like and cpu presets)")
    parser.add_argument('--memory-room', type=float,
                        help='train: the memory budget of the planned policy, as a share of the '
                        "un-checkpointed activations (default: LLaVA-1.5-7B's on 8x80 GB, ZeRO-2)")
    parser.add_argument('--ablation', action='store_true',
                        help='train: also time mllm with each term (padding-free, answer-only '
                        'head, last layer, recompute policy) turned back to XTuner\'s way')
    parser.add_argument('--config', help='step/project: the recipe (e.g. '
                        'convllava_vicuna7b_768_stage3)')
    parser.add_argument('--stage', choices=['pretrain', 'finetune'], default='finetune',
                        help='step/project: which data the projection uses')
    parser.add_argument('--device', default='cuda', help='step: cuda or cpu (default cuda)')
    parser.add_argument('--text-tokens', type=int, help='step/project: text tokens per sample')
    parser.add_argument('--mfu', type=float, default=0.4,
                        help='project: assumed model FLOPs utilisation (default 0.4)')
    parser.add_argument('--stages', nargs='+', default=['zero1', 'zero2', 'zero3'],
                        help='memory: ZeRO stages to run')
    parser.add_argument('--tiny', action='store_true',
                        help='gpu: the tiny config on CPU in seconds (the kit\'s own check)')


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, float):
            value = f'{value:.4g}'
        elif isinstance(value, list) and len(value) > 8:
            value = f'[{len(value)} values]'
        print(f'{key:<28} {value}')


def run(args) -> int:
    import torch

    from mllm.bench import benchmark

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        if args.mode == 'train':
            preset = dict(benchmark.BENCH_PRESETS[args.preset or 'tiny'])
            explicit = dict(steps=args.steps, llm_layers=args.llm_layers,
                            num_samples=args.samples)
            for key, value in explicit.items():  # flags given on the command line win
                if value is not None:
                    preset[key] = value
            checkpointing = preset.pop('checkpointing') or args.checkpointing
            result = benchmark.bench_train(work_dir, batch_size=args.batch_size or 16,
                                           sampler=args.sampler,
                                           answer_only_last_layer=not args.full_last_layer,
                                           checkpointing=checkpointing,
                                           memory_room=args.memory_room,
                                           ablation=args.ablation, **preset)
        elif args.mode == 'data':
            result = benchmark.bench_data(work_dir)
        elif args.mode == 'scale':
            result = benchmark.bench_scale(work_dir)
        elif args.mode == 'gpu':
            from mllm.bench.gpu import bench_gpu
            result = bench_gpu(config=args.config or 'llava15_vicuna7b_finetune',
                               device=args.device, steps=args.steps or 3,
                               llm_layers=args.llm_layers, tiny=args.tiny,
                               rounds=args.rounds)
        elif args.mode == 'memory':
            result = benchmark.bench_memory(work_dir, stages=args.stages,
                                            iters=args.steps or 4)
        elif not args.config:
            raise ValueError(f'mllm bench {args.mode} needs --config (a recipe name or file)')
        elif args.mode == 'project':
            from mllm.engine.config import load_config
            result = benchmark.bench_project(load_config(args.config), stage=args.stage,
                                             mfu=args.mfu, text_tokens=args.text_tokens)
        else:
            from mllm.engine.config import load_config
            result = benchmark.bench_step(load_config(args.config), stage=args.stage,
                                          device=args.device, steps=args.steps or 3,
                                          batch=args.batch_size, text_tokens=args.text_tokens)
        result['threads'] = args.threads
    _print(result, args.json)
    return 0
