"""Checkpoint files that are safe to load, verifiable, and found again on resume.

- **No code runs from a checkpoint.** Every load is ``torch.load(weights_only=True)``.
  mllm writes only tensors and plain types: the runner state MMEngine keeps as objects
  (``HistoryBuffer``, NumPy arrays and scalars) is encoded by ``encode_state`` on save and
  rebuilt by ``decode_state`` on load. DeepSpeed's own files hold four small data classes
  (``SAFE_CLASS_NAMES``), allowed by name to torch's safe loader; none has unpickling code.
  A third-party file that needs the full unpickler loads only when the user names it
  (``--trust-checkpoint PATH``, ``trust_checkpoint``).
- **Integrity.** Next to each checkpoint ``iter_N.pth`` (a file, or a DeepSpeed folder) lies
  ``iter_N.pth.sha256`` in ``sha256sum`` format (``cd WORK_DIR && sha256sum -c
  iter_N.pth.sha256`` checks it by hand). Loading verifies it.
- **Resume.** ``newest_valid_checkpoint`` scans the work dir itself (not a stored absolute
  path), so a moved or copied work dir resumes from its own files, and a damaged newest
  checkpoint falls back to the one before, by name.
"""
import glob
import hashlib
import logging
import os
import pickle
import re
import sys
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import print_log

CHECKSUM_SUFFIX = '.sha256'
PARTIAL_SUFFIX = '.partial'
CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
_TAG = '__mllm_encoded__'


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, empty, damaged or unsafe to load."""


# ------------------------------------------------------------------ plain-type encoding

def encode_state(value):
    """``value`` with the objects torch's safe loader refuses replaced by tagged dicts of
    tensors and plain types: MMEngine's ``HistoryBuffer``, NumPy arrays and scalars.
    Containers keep their type; anything else is returned as it is."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    if isinstance(value, HistoryBuffer):
        log, count = value.data
        return {_TAG: 'HistoryBuffer', 'log_history': encode_state(log),
                'count_history': encode_state(count), 'max_length': value.max_length}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError('a NumPy array of Python objects cannot be stored safely')
        array = np.ascontiguousarray(value)
        return {_TAG: 'ndarray', 'dtype': array.dtype.str, 'shape': list(array.shape),
                'bytes': torch.from_numpy(array.reshape(-1).view(np.uint8).copy())}
    if isinstance(value, np.generic):
        return {_TAG: 'numpy_scalar', 'dtype': value.dtype.str, 'value': value.item()}
    return _map_items(value, encode_state)


def _map_items(value, fn):
    """``value`` with ``fn`` applied to the items of a dict, list or tuple; the container
    keeps its type (``OrderedDict``, MMEngine's ``ConfigDict``). Anything else unchanged."""
    if isinstance(value, dict):
        if type(value) is dict:
            return {k: fn(v) for k, v in value.items()}
        rebuilt = type(value)()
        for key, item in value.items():
            rebuilt[key] = fn(item)
        return rebuilt
    if type(value) in (list, tuple):
        return type(value)(fn(v) for v in value)
    return value


def decode_state(value):
    """The inverse of ``encode_state``."""
    if isinstance(value, dict) and _TAG in value:
        return _decode_tagged(value[_TAG], value)
    return _map_items(value, decode_state)


def _decode_tagged(tag: str, value: dict):
    import numpy as np
    from mmengine.logging import HistoryBuffer

    if tag == 'HistoryBuffer':
        return HistoryBuffer(decode_state(value['log_history']),
                             decode_state(value['count_history']), value['max_length'])
    if tag == 'ndarray':
        raw = value['bytes'].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(value['dtype'])).reshape(value['shape']).copy()
    if tag == 'numpy_scalar':
        return np.dtype(value['dtype']).type(value['value'])
    raise CheckpointError(f'unknown encoded value {tag!r} (written by a newer mllm?)')


# ------------------------------------------------------------------ the safe loader

# Plain data classes that DeepSpeed and MMEngine pickle into DeepSpeed checkpoint files (the
# DeepSpeed config, ZeRO bookkeeping, the loss scaler), allowed by name to torch's safe
# loader. They are rebuilt from their fields; none defines unpickling code.
SAFE_CLASS_NAMES = (
    'mmengine.config.config.ConfigDict',
    'deepspeed.runtime.fp16.loss_scaler.LossScaler',
    'deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler',
    'deepspeed.runtime.zero.config.ZeroStageEnum',
    'deepspeed.utils.tensor_fragment.fragment_address',
)


def safe_classes(names=SAFE_CLASS_NAMES, import_modules: bool = False) -> list:
    """The classes of ``names`` whose modules are loaded (all of them with
    ``import_modules``: importing DeepSpeed takes seconds, so only when a file needs it)."""
    import importlib

    classes = []
    for name in names:
        module, _, cls = name.rpartition('.')
        if module in sys.modules or import_modules:
            classes.append(getattr(importlib.import_module(module), cls))
    return classes


_trusted: set = set()


def trust_checkpoint(path: str) -> None:
    """Allow ``path`` (a file, or a folder and every file in it) to be loaded with the full
    unpickler, which can run code stored in the file. Only for files the user names."""
    _trusted.add(os.path.realpath(path))


def is_trusted(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == t or real.startswith(t + os.sep) for t in _trusted)


def load_checkpoint_file(path: str, map_location='cpu'):
    """Load one checkpoint file safely: it must exist and be non-empty, match its recorded
    checksum, and unpickle with ``weights_only=True`` (plus ``safe_classes``); mllm's
    encoded runner state is decoded. Files that need the full unpickler raise
    ``CheckpointError`` naming the file and its classes, unless the user trusted them."""
    verify_file(path)
    try:
        try:
            with torch.serialization.safe_globals(safe_classes()):
                state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            unsafe = _unsafe_globals(path, allowed=())
            if not unsafe or not set(unsafe) <= set(SAFE_CLASS_NAMES):
                raise
            with torch.serialization.safe_globals(safe_classes(unsafe, import_modules=True)):
                state = torch.load(path, map_location=map_location, weights_only=True)
        return decode_state(state)
    except pickle.UnpicklingError as err:
        if not is_trusted(path):
            raise CheckpointError(
                f'{path} holds objects that torch\'s safe loader refuses '
                f'({", ".join(_unsafe_globals(path)) or err}); loading them could run code '
                f'stored in the file. mllm\'s own checkpoints never need that. If you trust '
                f'this file, pass --trust-checkpoint {path}') from None
        print_log(f'{path}: loading with the full unpickler (weights_only=False), as '
                  '--trust-checkpoint asked', logger='current', level=logging.WARNING)
        return decode_state(torch.load(path, map_location=map_location, weights_only=False))
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f'{path} is damaged or truncated and cannot be read '
                              f'({type(err).__name__}: {str(err).strip() or "no detail"})') from err


def _unsafe_globals(path: str, allowed=SAFE_CLASS_NAMES) -> List[str]:
    """The globals of ``path``'s pickle that torch's safe loader does not allow by itself,
    less ``allowed``."""
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if g not in allowed]
    except Exception:  # noqa: BLE001 - only used to word the error
        return []


# ------------------------------------------------------------------ checksums

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(checkpoint: str) -> List[str]:
    """The file itself, or every file of a DeepSpeed checkpoint folder, sorted."""
    if os.path.isdir(checkpoint):
        return sorted(os.path.join(root, name) for root, _, names in os.walk(checkpoint)
                      for name in names)
    return [checkpoint]


def write_checksums(checkpoint: str, final_name: Optional[str] = None) -> str:
    """Write ``<final>.sha256`` beside ``checkpoint`` in ``sha256sum`` format, one line per
    file, named relative to the folder that holds the checkpoint. ``final_name`` is the name
    the checkpoint will be renamed to (it is written as ``.iter_N.pth.partial`` first)."""
    parent = os.path.dirname(checkpoint)
    final = os.path.join(parent, final_name or os.path.basename(checkpoint))
    lines = [f'{_sha256(f)}  {os.path.relpath(f.replace(checkpoint, final, 1), parent)}\n'
             for f in checkpoint_files(checkpoint)]
    tmp = final + CHECKSUM_SUFFIX + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final + CHECKSUM_SUFFIX)
    return final + CHECKSUM_SUFFIX


def _recorded(path: str) -> Optional[Tuple[str, str]]:
    """``(checksum file, recorded sha256)`` of ``path``: its own ``.sha256``, or the one of
    the DeepSpeed checkpoint folder that holds it; None when nothing is recorded."""
    real = os.path.abspath(path)
    for checkpoint in (real, os.path.dirname(real)):
        sums = checkpoint + CHECKSUM_SUFFIX
        if os.path.isfile(sums):
            parent = os.path.dirname(checkpoint)
            with open(sums) as f:
                for line in f:
                    digest, _, name = line.rstrip('\n').partition('  ')
                    if os.path.join(parent, name) == real:
                        return sums, digest
            raise CheckpointError(f'{path} is not listed in {sums}: the checkpoint is not the '
                                  'one the checksum file was written for')
    return None


_verified: Dict[Tuple[str, int, float], bool] = {}


def verify_file(path: str) -> None:
    """Raise ``CheckpointError`` naming ``path`` if it is missing, empty or does not match
    its recorded checksum. Each file is hashed once per process."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    stat = os.stat(path)
    if stat.st_size == 0:
        raise CheckpointError(f'{path} is empty (0 bytes): the run that wrote it was probably '
                              'killed or ran out of disk; use an earlier checkpoint')
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime)
    if key in _verified:
        return
    recorded = _recorded(path)
    if recorded is not None and _sha256(path) != recorded[1]:
        raise CheckpointError(f'{path} is damaged: its sha256 differs from the one recorded in '
                              f'{recorded[0]} when it was written')
    _verified[key] = True


def verify_checkpoint(checkpoint: str) -> Optional[str]:
    """Why ``checkpoint`` (file or DeepSpeed folder) is not complete and intact, or None."""
    sums = checkpoint + CHECKSUM_SUFFIX
    if not os.path.isfile(sums):
        return f'it has no {os.path.basename(sums)} (not written by this version of mllm)'
    parent = os.path.dirname(checkpoint)
    with open(sums) as f:
        listed = [os.path.join(parent, line.rstrip('\n').partition('  ')[2]) for line in f]
    missing = [p for p in listed if not os.path.isfile(p)]
    if missing or not listed:
        return f'{len(missing)} of its files are missing ({", ".join(missing[:2])})'
    try:
        for path in listed:
            verify_file(path)
    except CheckpointError as err:
        return str(err)
    return None


# ------------------------------------------------------------------ resume

def checkpoints_in(work_dir: str) -> List[str]:
    """The checkpoints (``iter_N.pth`` / ``epoch_N.pth``, files or DeepSpeed folders) of a
    work dir, newest (highest N) first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(work_dir), '*.pth')):
        match = CHECKPOINT_NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found, reverse=True)]


def newest_valid_checkpoint(work_dir: str) -> Optional[str]:
    """The newest complete, intact checkpoint of ``work_dir``; each newer one that is
    damaged or incomplete is reported by name. None when the work dir has none."""
    for path in checkpoints_in(work_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print_log(f'--resume auto: skipping {path}: {problem}', logger='current',
                  level=logging.WARNING)
    return None


def remove_partials(work_dir: str) -> List[str]:
    """Remove ``.iter_N.pth.partial`` files or folders a killed save left behind."""
    import shutil

    removed = []
    for path in glob.glob(os.path.join(glob.escape(work_dir), '.*' + PARTIAL_SUFFIX)):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        print_log(f'removed {len(removed)} incomplete checkpoint(s) an interrupted save left: '
                  f'{", ".join(map(os.path.basename, removed))}', logger='current',
                  level=logging.WARNING)
    return removed
