"""``mllm print-config CONFIG [--cfg-options ...]``: the config the runner will see."""
from mmengine.config import DictAction


def add_arguments(parser):
    parser.add_argument('config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def run(args) -> int:
    from mllm.engine.config import load_config
    print(load_config(args.config, args.cfg_options).pretty_text)
    return 0
