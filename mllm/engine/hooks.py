"""Runner hooks."""
import os
import shutil

import torch
from mmengine.dist import all_reduce, barrier, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper

from mllm.engine.checkpoint import (SAFE_CLASS_NAMES, CheckpointError, checkpoint_files,
                                    encode_state, write_checksums)
from mllm.registry import HOOKS


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class TrainableCheckpointHook(Hook):
    """Checkpoints hold what trains now plus what the run started from; frozen pretrained
    weights stay out.

    Saving keeps the trainable tensors and every tensor the run loaded from a checkpoint
    (``load_from`` or resume). A projector-only pretraining checkpoint is megabytes, not the
    whole LLM. A later stage that freezes parts an earlier stage trained (ConvLLaVA's stage 3
    freezes the stage-2 vision stages) still writes them, so the last stage's checkpoint is
    complete on top of the pretrained towers. Loading fills the absent frozen tensors from
    the freshly built model, so resuming and ``load_from`` see a complete state dict, and
    only genuinely unexpected or missing keys are reported.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self.carried = set()  # keys that came in through a loaded checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = _unwrap(runner.model)
        keep = {n for n, p in model.named_parameters() if p.requires_grad} | self.carried
        state = checkpoint['state_dict']
        kept = {k: v for k, v in state.items() if k in keep}
        saved_mb = sum(v.numel() * v.element_size() for v in kept.values()) / 2**20
        runner.logger.info(f'checkpoint keeps {len(kept)} of {len(state)} tensors ({saved_mb:.1f} '
                           'MB: trainable + carried over); the frozen pretrained weights are left out')
        checkpoint['state_dict'] = kept
        checkpoint.setdefault('meta', {})['trainable_only'] = True

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('state_dict')
        if state is None:
            return
        self.carried |= set(state)
        if not checkpoint.get('meta', {}).get('trainable_only'):
            return
        for key, value in _unwrap(runner.model).state_dict().items():
            state.setdefault(key, value)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Checkpoints carry the Python, NumPy and torch (CPU and CUDA) RNG states; resuming
    restores them, so dropout and any other random op continue the interrupted run's
    sequence instead of restarting from the seed (bit-exact resume with dropout).

    ``load_from`` (a new stage) keeps its own seeded state. Saved from the process that
    writes the checkpoint (rank 0): MMEngine seeds every rank alike unless
    ``randomness.diff_rank_seed`` is set.
    """

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        import random

        import numpy as np
        checkpoint['rng_state'] = dict(
            python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        import random

        import numpy as np
        state = checkpoint.get('rng_state')
        if state is None or not getattr(runner, '_resume', False):
            return
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if state.get('cuda') is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
        runner.logger.info('resumed the RNG states of the checkpoint')


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Stores the checkpoint's non-tensor state as plain types, after every other hook has
    added its part (lowest priority): MMEngine's message hub holds ``HistoryBuffer``
    objects and NumPy values, the RNG states a NumPy array, which torch's safe loader
    refuses. ``mllm.engine.checkpoint.load_checkpoint_file`` decodes them. ``build_runner``
    adds this hook to every run."""

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.update(encode_state(dict(checkpoint)))


def _check_loads_safely(checkpoint: str) -> None:
    """Every file of a checkpoint just written must load with torch's safe loader; a file
    that would not is an mllm bug, reported at the first save instead of at resume."""
    for name in checkpoint_files(checkpoint):
        if os.path.isdir(checkpoint) and not name.endswith(('.pt', '.pth')):
            continue  # a DeepSpeed folder's other files (latest, zero_to_fp32.py) are not pickles
        unsafe = (set(torch.serialization.get_unsafe_globals_in_checkpoint(name))
                  - set(SAFE_CLASS_NAMES))
        if unsafe:
            raise CheckpointError(f'{name} would need the full unpickler to load '
                                  f'({", ".join(sorted(unsafe))}); refusing to keep it')


def _fsync_tree(path: str) -> None:
    """Flush a checkpoint file, or every file of a DeepSpeed checkpoint folder, to disk."""
    for name in checkpoint_files(path):
        with open(name, 'rb') as f:
            os.fsync(f.fileno())


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook`` with crash-safe, verifiable saving; same arguments.

    A checkpoint is written as ``.iter_N.pth.partial`` in the work dir, checked to load with
    torch's safe loader, fsynced, its sha256 recorded in ``iter_N.pth.sha256``, and renamed
    into place (``os.replace``); only then does ``last_checkpoint`` name it (relative to the
    work dir, so a moved work dir still agrees) and are checkpoints beyond
    ``max_keep_ckpts`` removed. A kill at any moment leaves the previous checkpoint named and
    complete. (MMEngine removes the oldest checkpoint *before* saving the new one and writes
    the file in place.) It refuses to save weights that are not finite.
    """

    def _check_finite(self, runner) -> None:
        # under ZeRO-3 a parameter's data lives in its partition (ds_tensor), one per rank
        bad = [n for n, p in _unwrap(runner.model).named_parameters() if p.requires_grad and
               not torch.isfinite(getattr(p, 'ds_tensor', p).detach()).all()]
        count = torch.tensor([float(len(bad))])
        all_reduce(count)  # every rank refuses together (none is left waiting in a barrier)
        if count.item():
            raise RuntimeError(f'refusing to write a checkpoint: {int(count.item())} trainable '
                               f'tensors (summed over ranks) hold NaN/inf ({", ".join(bad[:3])}'
                               f'...); the last complete checkpoint is still '
                               f'{self.last_ckpt or "none"}')

    def _save_checkpoint_with_step(self, runner, step, meta):
        self._check_finite(runner)
        filename = self.filename_tmpl.format(step)
        final = self.file_backend.join_path(self.out_dir, filename)
        partial = self.file_backend.join_path(self.out_dir, f'.{filename}.partial')
        outdated = []
        if self.max_keep_ckpts > 0 and (not self.keep_ckpt_ids or self.keep_ckpt_ids[-1] != step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids[0])
            self.keep_ckpt_ids.append(step)  # a deque of maxlen max_keep_ckpts
            # saved inside the checkpoint, so a resumed run knows which files to retire
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        previous, self.last_ckpt = self.last_ckpt, final
        runner.message_hub.update_info('last_ckpt', filename)  # relative: the dir may move
        if is_main_process():
            _remove(partial)
        runner.save_checkpoint(self.out_dir, os.path.basename(partial), self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        barrier()  # every rank's shard of a DeepSpeed checkpoint is written
        if not is_main_process():
            return
        try:
            _check_loads_safely(partial)
        except CheckpointError:
            _remove(partial)
            raise
        _fsync_tree(partial)
        _remove(final)
        write_checksums(partial, final_name=filename)
        os.replace(partial, final)
        _atomic_write_text(os.path.join(runner.work_dir, 'last_checkpoint'),
                           os.path.relpath(final, runner.work_dir))
        for old in outdated:
            old_path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            _remove(old_path)
            _remove(old_path + '.sha256')
        runner.logger.info(f'saved {final} atomically (previous: {previous})')


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


@HOOKS.register_module()
class RankMeanLossHook(Hook):
    """Log the losses averaged over ranks; MMEngine logs rank 0's alone, which is not the
    loss of the global batch and so not comparable with a single-process run. Added by
    ``build_runner`` to multi-process runs."""

    priority = 'HIGHEST'  # before RuntimeInfoHook (VERY_HIGH) copies outputs to the hub

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not outputs or get_world_size() == 1:
            return
        keys = [k for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
        values = torch.stack([outputs[k].detach().float().reshape(()) for k in keys])
        all_reduce(values, op='mean')
        for key, value in zip(keys, values):
            outputs[key] = value


@HOOKS.register_module()
class ThroughputHook(Hook):
    """Logs ``tokens_per_s`` and ``samples_per_s`` per process (and ``tflops_per_gpu`` on
    CUDA) into the message hub, so they land in ``vis_data/scalars.json`` with the loss.

    Tokens are the attended positions of the batch (``attention_mask`` sum: text and visual
    tokens, no padding; ``num_tokens`` for packed batches). Time is the wall clock between
    consecutive iterations, data loading included. TFLOPs use the usual ``6 x parameters x tokens`` estimate (forward + backward;
    attention and frozen parts' skipped weight gradients are ignored), so it is approximate.
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) writes the iteration's scalars

    def __init__(self):
        self._last = None
        self._num_params = None

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        import time
        if self._last is None:
            self._last = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        import time

        import torch

        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        if not isinstance(data_batch, dict) or seconds <= 0:
            return
        mask = data_batch.get('attention_mask')
        if mask is not None:
            tokens, samples = float(mask.sum()), mask.shape[0]
        elif 'num_tokens' in data_batch:  # packed batch: real tokens counted by the collate
            tokens = float(data_batch['num_tokens'])
            samples = sum(len(row) for row in data_batch['sample_rows'])
        else:
            return
        hub = runner.message_hub
        hub.update_scalar('train/tokens_per_s', tokens / seconds)
        hub.update_scalar('train/samples_per_s', samples / seconds)
        if torch.cuda.is_available():
            if self._num_params is None:
                self._num_params = sum(p.numel() for p in _unwrap(runner.model).parameters())
            hub.update_scalar('train/tflops_per_gpu',
                              6 * self._num_params * tokens / seconds / 1e12)


@HOOKS.register_module()
class PeakMemoryHook(Hook):
    """Writes this rank's RSS when training starts and its peak RSS (``ru_maxrss``) when
    the run ends to ``<work_dir>/peak_memory_rank<R>.json`` (``mllm bench memory``).

    Args:
        out_dir: folder for the files. Defaults to the runner's work_dir.
    """

    def __init__(self, out_dir=None):
        self.out_dir = out_dir
        self._start_mb = None

    @staticmethod
    def _rss_mb() -> float:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024

    def before_train(self, runner) -> None:
        self._start_mb = self._rss_mb()

    def after_run(self, runner) -> None:
        import json
        import resource

        from mmengine.dist import get_rank
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        path = os.path.join(self.out_dir or runner.work_dir, f'peak_memory_rank{get_rank()}.json')
        with open(path, 'w') as f:
            json.dump(dict(rss_at_train_start_mb=self._start_mb, peak_rss_mb=peak), f)
