"""``mllm copy-cfg NAME DEST``: a shipped config as a starting point (inheritance is usually
shorter: a file with ``_base_ = ['path/to/NAME.py']`` plus what differs)."""
import os

from mllm.engine.config import find_config


def add_arguments(parser):
    parser.add_argument('name', help='shipped config name (see `mllm list-cfg`)')
    parser.add_argument('dest', help='destination file or folder')


def run(args) -> int:
    src = find_config(args.name)
    dest = os.path.join(args.dest, os.path.basename(src)) if os.path.isdir(args.dest) else args.dest
    if os.path.exists(dest):
        raise FileExistsError(f'{dest} exists; not overwriting it')
    # _base_ paths are relative to the source file: point them at the shipped bases
    with open(src) as f:
        text = f.read()
    base_dir = os.path.relpath(os.path.dirname(src), os.path.dirname(os.path.abspath(dest)))
    text = text.replace("'../_base_/", f"'{os.path.join(base_dir, '..', '_base_')}/")
    text = text.replace("'./", f"'{base_dir}/")
    with open(dest, 'w') as f:
        f.write(text)
    print(f'copied {src} -> {dest}')
    return 0
