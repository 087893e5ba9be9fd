"""``mllm eval MODEL --bench NAME --data PATH [--image-folder DIR] [--out DIR]``: answer a
benchmark in its public file format (``mllm.evaluation.benchmarks``) with greedy decoding and
the training prompt path, then score it (``mllm.evaluation.evaluation``).

Writes ``<out>/predictions.jsonl`` (one line per sample: question, answer, prediction,
correct) and ``<out>/summary.json``, and prints the summary table.
"""
import json
import os

from mmengine.config import DictAction

from mllm.evaluation.benchmarks import LOADERS


def add_arguments(parser):
    parser.add_argument('model', help='exported folder, or a config (then --checkpoint)')
    parser.add_argument('--checkpoint', help="iter_N.pth of the config's training")
    parser.add_argument('--bench', required=True, choices=sorted(LOADERS))
    parser.add_argument('--data', required=True, help='benchmark file (folder for MME)')
    parser.add_argument('--image-folder', help='folder the benchmark\'s image names are in')
    parser.add_argument('--out', help='output folder (default: eval/<bench>)')
    parser.add_argument('--max-new-tokens', type=int, default=16)
    parser.add_argument('--limit', type=int, help='only the first N samples (smoke runs)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    from mllm.cli.chat import add_trust_arguments
    add_trust_arguments(parser)


def model_predictor(model, tokenizer, image_processor, template, max_new_tokens: int):
    """``predict(sample) -> str``: one greedy answer, prompted exactly as in training."""
    from mllm.evaluation.benchmarks import open_image
    from mllm.datasets.templates import IMAGE_TOKEN
    from mllm.inference.inference import generate_reply, prompt_inputs

    def predict(sample: dict) -> str:
        turn = [{'from': 'human', 'value': f"{IMAGE_TOKEN}\n{sample['prompt']}"}]
        batch = prompt_inputs(turn, tokenizer, template, image_processor, open_image(sample))
        return generate_reply(model, tokenizer, template, batch, max_new_tokens)
    return predict


def print_summary(bench: str, summary: dict, num_samples: int) -> None:
    width = max(len(k) for k in summary) + 2
    print(f'\n{bench} ({num_samples} samples)\n' + '-' * (width + 10))
    for key, value in summary.items():
        print(f'{key:<{width}}{value:>10.2f}')


def run(args) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from mllm.evaluation.benchmarks import load_benchmark
    from mllm.evaluation.evaluation import evaluate
    from mllm.inference.inference import load_for_inference

    samples = load_benchmark(args.bench, args.data, args.image_folder)
    samples = samples[:args.limit] if args.limit else samples
    if not samples:
        raise ValueError(f'{args.data}: no {args.bench} samples to evaluate')
    predict = model_predictor(*load_for_inference(args.model, args.checkpoint, args.cfg_options,
                                                  args.trust_remote_code, args.trust_checkpoint),
                              max_new_tokens=args.max_new_tokens)
    result = evaluate(args.bench, samples, predict)
    out = args.out or os.path.join('eval', args.bench)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'predictions.jsonl'), 'w') as f:
        for record in result['records']:
            f.write(json.dumps(record) + '\n')
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(dict(bench=args.bench, model=args.model, checkpoint=args.checkpoint,
                       data=args.data, samples=len(samples), **result['summary']), f, indent=2)
    print_summary(args.bench, result['summary'], len(samples))
    print(f'\npredictions: {os.path.join(out, "predictions.jsonl")}')
    return 0
