"""Training loops."""
from xtuner.engine.runner import TrainLoop

from mllm.registry import LOOPS

# XTuner's iteration-based loop: `train_cfg = dict(type='TrainLoop', max_epochs=1)` or
# `max_iters=N` (exactly one of them), so `--cfg-options train_cfg.max_epochs=None
# train_cfg.max_iters=20` turns a recipe into a smoke run.
LOOPS.register_module(name='TrainLoop', module=TrainLoop)
