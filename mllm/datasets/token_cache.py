"""Offline tokenisation cache for ``LLaVADataset``: tokenise a data file once, reuse it.

Every conversation is encoded with ONE image sentinel per image; the dataset expands that
sentinel into the image's token count when it reads the sample (the count depends on the
image and the processor, the text around it does not: ``encode_conversation`` tokenises
the text on either side of an image run separately), then truncates to ``max_length``
exactly as ``encode_conversation`` does. So one cache serves every image processor and
``max_length``.

A cache is a folder ``<cache_dir>/<key>/`` of numpy arrays, memory-mapped by readers (data
loader workers share the pages): ``ids.npy`` (int32, all samples concatenated),
``learned.npy`` (bool, label = id there, else ``IGNORE_INDEX``), ``offsets.npy`` (int64,
n + 1) and ``errors.json`` (encoding errors by sample index). The key hashes the data
file's bytes, the tokenizer (vocabulary, merges, normaliser, special tokens), the chat
template and the cache format, so changing any of them builds a new cache.
"""
import hashlib
import json
import os
import os.path as osp
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from mllm.datasets.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, truncate_to_max_length

CACHE_FORMAT = 1  # bump when the stored layout or the encoding rules change


def tokenizer_fingerprint(tokenizer) -> str:
    """Text that changes whenever the tokenizer would encode differently."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    body = (backend.to_str() if backend is not None
            else json.dumps(sorted(tokenizer.get_vocab().items())))
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return json.dumps([type(tokenizer).__name__, body, special, tokenizer.bos_token_id,
                       tokenizer.eos_token_id])


def cache_key(data_path: str, tokenizer, template) -> str:
    """sha256 (hex, 24 chars) of the data file, tokenizer, template and cache format."""
    digest = hashlib.sha256()
    with open(data_path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(repr(template).encode())  # ChatTemplate: a frozen dataclass, all fields
    digest.update(f'format {CACHE_FORMAT}'.encode())
    return digest.hexdigest()[:24]


class TokenCache:
    """Read side of one cache folder (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.ids = np.load(osp.join(folder, 'ids.npy'), mmap_mode='r')
        self.learned = np.load(osp.join(folder, 'learned.npy'), mmap_mode='r')
        self.offsets = np.load(osp.join(folder, 'offsets.npy'))
        with open(osp.join(folder, 'errors.json')) as f:
            self.errors = {int(k): v for k, v in json.load(f).items()}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, index: int, num_image_tokens: int,
            max_length: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of sample ``index`` with its image sentinel expanded to
        ``num_image_tokens``; ``ValueError`` as ``encode_conversation`` raises it."""
        if index in self.errors:
            raise ValueError(self.errors[index])
        start, end = self.offsets[index], self.offsets[index + 1]
        ids = torch.from_numpy(self.ids[start:end].astype(np.int64))
        labels = ids.masked_fill(~torch.from_numpy(self.learned[start:end].copy()), IGNORE_INDEX)
        if num_image_tokens:
            at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(at) != 1:
                raise ValueError(f'the text has {len(at)} image runs but one image')
            k = int(at[0])
            run = torch.full((num_image_tokens,), IMAGE_TOKEN_INDEX)
            ids = torch.cat([ids[:k], run, ids[k + 1:]])
            labels = torch.cat([labels[:k], run.fill_(IGNORE_INDEX), labels[k + 1:]])
        return truncate_to_max_length(ids, labels, max_length)  # encode_conversation's rule


class Progress:
    """A one-line progress bar on stderr (``done/total``, percent, rate, time left),
    redrawn at most every ``interval`` seconds, so a 665K-sample build stays readable in
    a log file too."""

    def __init__(self, total: int, title: str, interval: float = 2.0, stream=None):
        self.total, self.title, self.interval = total, title, interval
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate else float('inf')
        width = 30
        bar = '#' * (width * done // max(self.total, 1))
        self.stream.write(f'\r{self.title} [{bar:<{width}}] {done}/{self.total} '
                          f'({100 * done / max(self.total, 1):.0f}%, {rate:.0f}/s, '
                          f'{left:.0f} s left)' + ('\n' if done >= self.total else ''))
        self.stream.flush()


def sample_lengths(cache: TokenCache) -> dict:
    """Per sample (numpy int64 arrays): ``text`` tokens (the image sentinel excluded),
    ``images`` (sentinels, 0 or 1) and ``learned`` tokens (labels that are not
    ``IGNORE_INDEX``), without decoding any sample: what ``mllm plan`` reads as the data's
    real length distribution (a sample's length = text + images x visual tokens)."""
    def per_sample(mask):
        total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return total[cache.offsets[1:]] - total[cache.offsets[:-1]]

    images = per_sample(np.asarray(cache.ids) == IMAGE_TOKEN_INDEX)
    return dict(text=np.diff(cache.offsets) - images, images=images,
                learned=per_sample(np.asarray(cache.learned)))


def build_cache(folder: str, num_samples: int,
                encode: Callable[[int], Tuple[List[int], List[int]]],
                progress: Optional[bool] = None) -> None:
    """Write a cache of ``encode(i)`` -> (ids, labels) for every sample into ``folder``.

    Written to a temporary folder beside it and renamed, so readers never see a partial
    cache; when another process got there first, its cache is kept. ``progress`` draws a
    progress bar on stderr; None: only in the launch's rank 0 (every rank of a first
    distributed run builds the same cache)."""
    parent = osp.dirname(osp.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    if progress is None:
        progress = int(os.environ.get('RANK', 0)) == 0
    bar = Progress(num_samples, f'token cache {osp.basename(folder)}') if progress else None
    ids, learned, offsets, errors = [], [], [0], {}
    for i in range(num_samples):
        if bar is not None:
            bar.update(i)
        try:
            sample_ids, labels = encode(i)
        except ValueError as err:
            errors[i], sample_ids, labels = str(err), [], []
        ids.append(np.asarray(sample_ids, dtype=np.int32))
        learned.append(np.asarray(labels) != IGNORE_INDEX)
        offsets.append(offsets[-1] + len(sample_ids))
    if bar is not None:
        bar.update(num_samples)
    tmp = tempfile.mkdtemp(prefix='.building-', dir=parent)
    try:
        np.save(osp.join(tmp, 'ids.npy'), np.concatenate(ids) if ids else np.zeros(0, np.int32))
        np.save(osp.join(tmp, 'learned.npy'),
                np.concatenate(learned) if learned else np.zeros(0, bool))
        np.save(osp.join(tmp, 'offsets.npy'), np.asarray(offsets, dtype=np.int64))
        with open(osp.join(tmp, 'errors.json'), 'w') as f:
            json.dump(errors, f)
        os.rename(tmp, folder)
    except OSError:
        if not osp.isdir(folder):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
