"""``mllm list-cfg [-p PATTERN]``."""
import os

from mllm.engine.config import CONFIG_ROOT


def shipped_configs():
    for root, dirs, files in os.walk(CONFIG_ROOT):
        dirs[:] = sorted(d for d in dirs if d != '_base_')
        for f in sorted(files):
            if f.endswith('.py'):
                yield os.path.splitext(f)[0], os.path.join(root, f)


def add_arguments(parser):
    parser.add_argument('-p', '--pattern', help='only names containing this (case-insensitive)')


def run(args) -> int:
    names = [n for n, _ in shipped_configs()
             if not args.pattern or args.pattern.lower() in n.lower()]
    if not names:
        print(f'no config matches {args.pattern!r}')
        return 1
    print('\n'.join(names))
    return 0
