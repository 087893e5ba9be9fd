"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""
import glob
import json
import os
import subprocess
import sys

from mllm.engine.config import CONFIG_ROOT

REPO = os.path.dirname(CONFIG_ROOT)
TINY = os.path.join(CONFIG_ROOT, 'tiny', 'tiny_llava_synthetic.py')


def losses(work_dir):
    """Per-iteration losses from MMEngine's vis_data/scalars.json (newest run last)."""
    values = []
    for path in sorted(glob.glob(os.path.join(str(work_dir), '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            values += [json.loads(line)['loss'] for line in f if '"loss"' in line]
    return values


def run_mllm(*args, env=None, pre=''):
    """`python -m mllm ...`; ``pre`` is Python run first in the same process (fault injection)."""
    code = f'{pre}\nimport sys\nfrom mllm.cli import main\nsys.exit(main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def train(work_dir, synthetic, *extra, iters, config=TINY, options=(), env=None, pre=''):
    """The tiny config on 48 samples, batch 12: 4 iterations per epoch."""
    return run_mllm('train', config, '--work-dir', str(work_dir), *extra, '--cfg-options',
                    f'train_cfg.max_iters={iters}', 'default_hooks.logger.interval=1',
                    'default_hooks.checkpoint.interval=2', 'train_dataloader.batch_size=12',
                    f'train_dataloader.dataset.data_path={synthetic["train"]}',
                    f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}',
                    f'tokenizer.pretrained={synthetic["tokenizer"]}', *options, env=env, pre=pre)


def swap_config(tmp_path, recipe, llm):
    """A backbone swap: a two-line file that inherits the recipe and an LLM base."""
    path = tmp_path / f'{recipe}_{llm}.py'
    path.write_text(f"_base_ = ['{CONFIG_ROOT}/_base_/recipes/{recipe}.py', "
                    f"'{CONFIG_ROOT}/_base_/llms/{llm}.py']\n")
    return str(path)


# A plugin module (written to a file, imported with `custom_imports`) registering a test-only
# model whose loss is NaN on the given 1-based training steps, on every rank or on `nan_rank`.
NAN_MODEL = '''
import os

from mllm.models.llava import LLaVAModel
from mllm.registry import MODELS


@MODELS.register_module()
class NaNOnStepsLLaVA(LLaVAModel):
    """Test-only: the loss is NaN on the given (1-based) training steps."""

    def __init__(self, nan_steps=(), nan_rank=None, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps, self.nan_rank, self.calls = set(nan_steps), nan_rank, 0

    def forward(self, *args, mode='loss', **kwargs):
        out = super().forward(*args, mode=mode, **kwargs)
        if mode == 'loss':
            self.calls += 1
            on_rank = self.nan_rank is None or os.environ.get('RANK') == str(self.nan_rank)
            if self.calls in self.nan_steps and on_rank:
                out['loss'] = out['loss'] * float('nan')
        return out
'''


def import_llava_train():
    """Official LLaVA's ``llava.train.train`` (llava-torch, haotian-liu/LLaVA) under
    transformers 5. It imports ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``, which
    transformers 4.x exported as ``[nn.LayerNorm]`` and 5.x removed; LLaVA's trainer only
    uses it to exclude norm weights from weight decay. Set it back, then import."""
    import torch
    import transformers.trainer

    if not hasattr(transformers.trainer, 'ALL_LAYERNORM_LAYERS'):
        transformers.trainer.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    import llava.train.train as llava_train
    return llava_train
