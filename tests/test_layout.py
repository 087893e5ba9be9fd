"""The package's import direction: cli -> jobs -> engine/models -> datasets -> registry.

Every ``import``/``from ... import`` of an mllm module is read from the source (lazy imports
inside functions included), so a helper imported "just once" from a higher layer fails here
instead of growing into an import circle.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'mllm'

# lower number = lower layer; a module may import its own layer or a lower one
LAYERS = {'registry': 0, 'hf_utils': 0, 'datasets': 1, 'models': 2, 'engine': 2,
          'inference': 3, 'evaluation': 4, 'bench': 4, 'sweep': 5, 'cli': 6, '__main__': 7}


def _part(module: str) -> str:
    return module.split('.')[1] if module.count('.') else ''


def _imports():
    """(importing file, its top-level part, imported mllm module) for every mllm import."""
    for path in sorted(PACKAGE.rglob('*.py')):
        rel = path.relative_to(PACKAGE.parent).with_suffix('')
        part = rel.parts[1] if len(rel.parts) > 1 else ''
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith('mllm.') and _part(name) in LAYERS:
                    yield str(rel), part.removesuffix('.py') if part else '', name


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == '.py' and p.stem != '__init__') or (p / '__init__.py').exists()}
    assert parts <= set(LAYERS), f'give these a layer in LAYERS: {sorted(parts - set(LAYERS))}'


# (importing file, imported module): allowed upward imports, each with its reason
EXCEPTIONS = {
    # XTuner's samplers import names transformers 5 removed; compat is a leaf of small named
    # patches (it imports no other mllm module) that must run first
    ('mllm/datasets/samplers', 'mllm.engine.compat'),
    ('mllm/datasets/samplers', 'mllm.engine'),
}


def test_imports_point_down():
    upward = sorted({f'{source} imports {name}' for source, part, name in _imports()
                     if part in LAYERS and LAYERS[_part(name)] > LAYERS[part]
                     and (source, name) not in EXCEPTIONS})
    assert not upward, 'imports that run back up:\n' + '\n'.join(upward)


def _module_of(name: str) -> str:
    """'mllm.inference.export.load_pretrained' -> 'mllm/inference/export' when that file exists."""
    parts = name.split('.')
    while parts:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix('.py').is_file():
            return '/'.join(parts)
        if (path / '__init__.py').is_file():
            return '/'.join(parts + ['__init__'])
        parts.pop()
    return name


def test_no_two_modules_import_each_other():
    edges = {(source, _module_of(name)) for source, _, name in _imports()}
    edges = {(a, b) for a, b in edges if a != b and not b.endswith('__init__')}
    circles = sorted(f'{a} <-> {b}' for a, b in edges if (b, a) in edges and a < b)
    assert circles == [], circles


def test_layout_test_sees_imports():
    # the checks above would pass on an empty walk; make sure they read real edges
    edges = {(source, _module_of(name)) for source, _, name in _imports()}
    assert ('mllm/inference/inference', 'mllm/inference/export') in edges
    assert ('mllm/inference/export', 'mllm/inference/loading') in edges
