"""Training loops.

``TrainLoop`` is XTuner's iteration-based loop (``max_epochs`` or ``max_iters``) with a
resume that jumps to the data position instead of replaying it: MMEngine's
``IterBasedTrainLoop`` calls ``next(dataloader)`` once per finished iteration on resume, so
every skipped image is decoded again (hours at LLaVA scale). Here the position is computed
(epoch = iter // batches per epoch, batch = iter % batches per epoch), the sampler is set to
that epoch and the batch sampler starts that many samples in, so nothing skipped is loaded
and the data order, hence the loss curve, is the uninterrupted run's.
"""
import logging
import time
from typing import Iterator, Sized

import torch
from mmengine.logging import print_log
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader, Sampler

from mllm.engine import compat
from mllm.registry import LOOPS

compat.apply_all()  # before XTuner: it imports names transformers 5 removed
from xtuner.engine.runner import TrainLoop as XTunerTrainLoop  # noqa: E402


class StartAt(Sampler):
    """The wrapped sampler, but its next pass starts ``start`` indices in (once).

    Delegates ``set_epoch`` and the length, so the loader and MMEngine's hooks still see
    the original sampler's epochs.
    """

    def __init__(self, sampler: Sized, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        for i, index in enumerate(self.sampler):
            if i >= start:
                yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def seek_dataloader(dataloader: DataLoader, iteration: int) -> _InfiniteDataloaderIterator:
    """An infinite iterator over ``dataloader`` whose next batch is the one an uninterrupted
    ``_InfiniteDataloaderIterator`` yields at ``iteration``; skipped batches are not loaded.

    The sampler's index order may depend only on its epoch (and seed), as MMEngine's
    ``DefaultSampler`` and XTuner's ``LengthGroupedSampler`` do.
    """
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is None or not hasattr(batch_sampler, 'sampler'):
        raise TypeError('seek_dataloader needs a DataLoader with a batch_size '
                        f'(got batch_sampler={batch_sampler!r})')
    epoch, batch = divmod(iteration, len(dataloader))
    sampler = batch_sampler.sampler
    if isinstance(sampler, StartAt):
        sampler = sampler.sampler
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    elif epoch:
        raise TypeError(f'cannot seek to epoch {epoch}: {type(sampler).__name__} has no set_epoch')
    # BatchSampler.sampler is a plain attribute (DataLoader's own attributes are frozen)
    batch_sampler.sampler = StartAt(sampler, batch * batch_sampler.batch_size)
    iterator = _InfiniteDataloaderIterator(dataloader)
    iterator._epoch = epoch  # the next epoch it starts is epoch + 1, as uninterrupted
    return iterator


@LOOPS.register_module()
class TrainLoop(XTunerTrainLoop):
    """XTuner's loop: ``train_cfg = dict(type='TrainLoop', max_epochs=1)`` or ``max_iters=N``
    (exactly one of them), so ``--cfg-options train_cfg.max_epochs=None
    train_cfg.max_iters=20`` turns a recipe into a smoke run. On resume it jumps to the
    data position (module doc) instead of replaying the finished iterations.
    """

    def __init__(self, runner, dataloader, *args, **kwargs):
        super().__init__(runner, dataloader, *args, **kwargs)
        loader = self.dataloader
        if isinstance(loader, DataLoader) and loader.generator is None:
            # every new DataLoader iterator (each epoch, a resume's seek) draws its workers'
            # base seed from the global torch RNG, the stream dropout uses; its own generator
            # keeps those draws out, so RNGStateHook's restored state continues the
            # interrupted run's stream exactly
            loader.generator = torch.Generator().manual_seed(runner.seed)

    def run(self):
        """MMEngine's ``IterBasedTrainLoop.run`` with ``seek_dataloader`` for the replay."""
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')  # DistSamplerSeedHook sets epoch 0 here
        if self._iter > 0:
            self._seek()
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            self.run_iter(next(self.dataloader_iterator))
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def _seek(self) -> None:
        started = time.perf_counter()
        self.dataloader_iterator = seek_dataloader(self.dataloader, self._iter)
        epoch, batch = divmod(self._iter, len(self.dataloader))
        print_log(f'resume: data position set to iter {self._iter} (epoch {epoch}, batch {batch} '
                  f'of {len(self.dataloader)}) in {time.perf_counter() - started:.3f} s, without '
                  'loading the skipped batches', logger='current', level=logging.INFO)
