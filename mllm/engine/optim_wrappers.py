"""Optimizer wrappers that skip steps with a non-finite loss or gradient norm.

``patches.skip_nonfinite_steps`` swaps them in for MMEngine's ``OptimWrapper`` /
``AmpOptimWrapper`` (and ``register_deepspeed_wrapper``'s for ``DeepSpeedOptimWrapper``) when
the config has ``nonfinite_loss=dict(max_consecutive=K)`` (``default_runtime.py`` sets K=5;
``nonfinite_loss=None`` turns it off).
"""
import logging
import math

import torch
import torch.distributed as dist
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mllm.registry import OPTIM_WRAPPERS


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


def _finite_everywhere(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks must skip together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class SkipNonFiniteMixin:
    """Skip the optimizer step of an update whose loss (any micro-batch, any rank) or
    gradient norm is not finite: the gradients are dropped, the weights and the
    optimizer state stay as they were, the step is logged, and after ``max_consecutive``
    skipped updates in a row training stops with ``NonFiniteLossError``.

    Backward still runs on a non-finite loss, so DDP's gradient all-reduce stays in step
    on every rank.
    """

    check_grad_norm = True

    def __init__(self, *args, max_consecutive: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        if max_consecutive < 1:
            raise ValueError(f'max_consecutive must be >= 1, got {max_consecutive}')
        self.max_consecutive = max_consecutive
        self.consecutive_skips = 0
        self.total_skips = 0
        self._bad_update = False

    def update_params(self, loss: torch.Tensor, step_kwargs=None, zero_kwargs=None) -> None:
        if not _finite_everywhere(loss):
            self._bad_update = True
            self._bad_value = f'loss {float(loss.detach().float()):g}'
        self.backward(self.scale_loss(loss))
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def _grad_norm(self) -> float:
        grads = [p.grad for group in self.optimizer.param_groups for p in group['params']
                 if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def step(self, **kwargs) -> None:
        if not self._bad_update and self.check_grad_norm:
            norm = self._grad_norm()  # after DDP's all-reduce: the same on every rank
            if not math.isfinite(norm):
                self._bad_update, self._bad_value = True, f'gradient norm {norm:g}'
        if self._bad_update:
            self._skip()
            return
        self.consecutive_skips = 0
        super().step(**kwargs)

    def _skip(self) -> None:
        self._bad_update = False
        self.consecutive_skips += 1
        self.total_skips += 1
        self.message_hub.update_scalar('train/skipped_steps', self.total_skips)
        if getattr(self, 'grad_name', None) == 'grad_norm':
            # MMEngine logs the norm from the clipping inside the step skipped here; without
            # this the log would repeat the previous step's norm for this one
            self.message_hub.update_scalar('train/grad_norm', float('nan'))
        print_log(f'non-finite {self._bad_value}: optimizer step skipped, weights unchanged '
                  f'({self.consecutive_skips} in a row, {self.total_skips} in all, stop at '
                  f'{self.max_consecutive} in a row)', logger='current', level=logging.WARNING)
        if self.consecutive_skips >= self.max_consecutive:
            raise NonFiniteLossError(
                f'{self.consecutive_skips} consecutive optimizer steps had a non-finite loss or '
                f'gradient norm (last: {self._bad_value}); stopping. Lower the learning rate, '
                'check the data, or raise nonfinite_loss.max_consecutive')


@OPTIM_WRAPPERS.register_module()
class SkipNonFiniteOptimWrapper(SkipNonFiniteMixin, OptimWrapper):
    """``OptimWrapper`` that skips non-finite steps (see ``SkipNonFiniteMixin``)."""


@OPTIM_WRAPPERS.register_module()
class SkipNonFiniteAmpOptimWrapper(SkipNonFiniteMixin, AmpOptimWrapper):
    """``AmpOptimWrapper`` that skips steps with a non-finite loss; non-finite fp16
    gradients are left to its loss scaler, which skips them and lowers the scale."""

    check_grad_norm = False


def register_deepspeed_wrapper() -> type:
    """Register (once) and return ``SkipNonFiniteDeepSpeedOptimWrapper``; a function so
    that DeepSpeed (seconds to import) is imported only by DeepSpeed runs."""
    if 'SkipNonFiniteDeepSpeedOptimWrapper' in OPTIM_WRAPPERS.module_dict:
        return OPTIM_WRAPPERS.get('SkipNonFiniteDeepSpeedOptimWrapper')
    from mmengine.logging import MessageHub
    from mmengine._strategy.deepspeed import DeepSpeedOptimWrapper

    @OPTIM_WRAPPERS.register_module()
    class SkipNonFiniteDeepSpeedOptimWrapper(SkipNonFiniteMixin, DeepSpeedOptimWrapper):
        """``DeepSpeedOptimWrapper`` that drops a micro-batch whose loss is not finite on
        any rank: every rank skips both the engine's backward and its step (so ZeRO's
        gradient reduce-scatters stay matched), weights and optimizer state stay as they
        were. Non-finite gradients behind a finite loss are left to DeepSpeed (its fp16
        loss scaler skips them; bf16/fp32 do not check)."""

        check_grad_norm = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.message_hub = MessageHub.get_current_instance()

        def update_params(self, loss: torch.Tensor, **kwargs) -> None:
            if not _finite_everywhere(loss):
                self._bad_value = f'loss {float(loss.detach().float()):g}'
                self._skip()
                return
            self.backward(loss)
            self.step()

    return SkipNonFiniteDeepSpeedOptimWrapper
