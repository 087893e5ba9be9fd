"""``mllm inspect CONFIG``: build the model on the meta device (no weights, seconds even for
34B) and report parameters per component, trainable parameters and visual tokens."""
import argparse
import json

from mmengine.config import DictAction

from mllm.bench.inspect import inspect_config


def parse_size(text: str):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'must look like 1536x768 (W x H), got {text!r}') from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {text!r}')
    return w, h


def add_arguments(parser):
    parser.add_argument('config')
    parser.add_argument('--image-size', type=parse_size, metavar='WxH',
                        help="image size to count visual tokens for (default: the config's)")
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def run(args) -> int:
    from mllm.engine.config import load_config

    report = inspect_config(load_config(args.config, args.cfg_options), args.image_size)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f'{"component":<20}{"parameters":>18}')
    for name, count in report['params'].items():
        print(f'{name:<20}{count:>18,}  ({count / 1e9:.3f} B)')
    print(f'{"trainable":<20}{report["trainable_params"]:>18,}')
    w, h = report['image_size']
    slices = f' ({report["slices"][0]}x{report["slices"][1]} slices + overview)' \
        if report.get('slices', [1, 1]) != [1, 1] else ''
    print(f'visual tokens for a {w}x{h} image: {report["visual_tokens"]}{slices}')
    return 0
