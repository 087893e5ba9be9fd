"""``mllm copy-cfg NAME DEST``: a shipped config as a starting point (inheritance is usually
shorter: a file with ``_base_ = ['path/to/NAME.py']`` plus what differs). The copy's
``_base_`` entries become absolute paths to the shipped bases, so it loads wherever it lands."""
import os
import re

from mllm.engine.config import find_config

# the `_base_ = [...]` (or `_base_ = '...'`) assignment, and the quoted relative paths in it
BASE_ASSIGNMENT = re.compile(r"^_base_\s*=\s*(\[.*?\]|'[^']*'|\"[^\"]*\")", re.S | re.M)
RELATIVE_PATH = re.compile(r"""(['"])(\.\.?/[^'"]*)\1""")


def add_arguments(parser):
    parser.add_argument('name', help='shipped config name (see `mllm list-cfg`)')
    parser.add_argument('dest', help='destination file, or a folder (NAME.py is written in it; '
                        'a DEST ending in / or without .py is a folder, created if need be)')


def absolute_bases(text: str, src_dir: str) -> str:
    """``text`` with each relative ``_base_`` path made absolute (MMEngine resolves them
    against the config's own folder, which a copy leaves)."""
    def absolute(path: re.Match) -> str:
        return repr(os.path.normpath(os.path.join(src_dir, path.group(2))))

    return BASE_ASSIGNMENT.sub(lambda block: RELATIVE_PATH.sub(absolute, block.group(0)), text)


def run(args) -> int:
    src = os.path.abspath(find_config(args.name))
    dest = args.dest
    if os.path.isdir(dest) or dest.endswith(os.sep) or not dest.endswith('.py'):
        os.makedirs(dest, exist_ok=True)
        dest = os.path.join(dest, os.path.basename(src))
    if os.path.exists(dest):
        raise FileExistsError(f'{dest} exists; not overwriting it')
    with open(src) as f:
        text = absolute_bases(f.read(), os.path.dirname(src))
    with open(dest, 'w') as f:
        f.write(text)
    print(f'copied {src} -> {dest}')
    return 0
