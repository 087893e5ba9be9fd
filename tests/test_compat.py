"""mllm.engine.compat: each patch does what it names, is a no-op where upstream works, and
XTuner's pieces that mllm takes (``TrainLoop``, ``LengthGroupedSampler``; ``LLaVAModel``,
datasets and collate for the benchmark) import and behave as under the old pins."""
import subprocess
import sys
import types

import pytest

from mllm.engine import compat

# XTuner's LengthGroupedSampler(per_device_batch_size=4, length_property='modality_length')
# over modality_length = [(-1) ** i * (3 * i % 17 + 1) for i in range(40)], epochs 0 and 1,
# recorded under the old pins (transformers 4.48.0, mmengine 0.10.6, deepspeed 0.16.2,
# torch 2.14.1): the same order must come out on the current stack
OLD_PINS_ORDER = {
    '0': [
        [28, 33, 21, 9, 31, 25, 13, 29, 39, 27, 37, 19, 7, 1, 35, 23, 22, 4, 32, 20, 36, 24,
         18, 34, 5, 10, 38, 26, 14, 8, 12, 6, 11, 16, 15, 3, 2, 30, 0, 17],
        [11, 10, 4, 38, 26, 36, 2, 18, 22, 39, 5, 21, 15, 1, 29, 23, 28, 32, 20, 14, 8, 30,
         6, 0, 33, 27, 9, 37, 31, 7, 35, 17, 16, 3, 25, 19, 13, 24, 12, 34],
    ],
    '3': [
        [28, 15, 9, 3, 37, 31, 35, 17, 5, 22, 4, 38, 26, 20, 8, 34, 11, 39, 27, 21, 25, 19,
         7, 29, 16, 10, 14, 2, 24, 18, 12, 6, 33, 32, 36, 30, 13, 1, 23, 0],
        [28, 38, 2, 36, 18, 12, 0, 34, 22, 10, 4, 32, 20, 8, 30, 6, 5, 15, 9, 37, 3, 25, 29,
         23, 11, 39, 33, 27, 21, 19, 35, 1, 16, 26, 14, 31, 13, 24, 7, 17],
    ],
}


def test_every_patch_is_documented_and_idempotent():
    assert compat.PATCHES and all(patch.__doc__ for patch in compat.PATCHES)
    compat.apply_all()
    compat.apply_all()


def test_transformers_is_safetensors_available(monkeypatch):
    import transformers.utils
    monkeypatch.delattr(transformers.utils, 'is_safetensors_available', raising=False)
    compat.transformers_is_safetensors_available()
    assert transformers.utils.is_safetensors_available() is True
    # where transformers has it (4.x), it is left alone
    upstream = lambda: True  # noqa: E731
    monkeypatch.setattr(transformers.utils, 'is_safetensors_available', upstream)
    compat.transformers_is_safetensors_available()
    assert transformers.utils.is_safetensors_available is upstream


def test_deepspeed_onebit_optimizers_let_mmengine_register_deepspeeds_optimizers():
    from mmengine._strategy.deepspeed import register_deepspeed_optimizers
    from mmengine.registry import OPTIMIZERS

    compat.deepspeed_onebit_optimizers()
    names = register_deepspeed_optimizers()  # what DeepSpeedStrategy.__init__ calls
    assert {'DeepSpeedCPUAdam', 'FusedAdam', 'OnebitAdam', 'ZeroOneAdam'} <= set(names)
    onebit = sys.modules['deepspeed.runtime.fp16.onebit']
    if getattr(onebit, 'mllm_compat', False):  # deepspeed >= 0.19.8: stand-ins that refuse
        with pytest.raises(RuntimeError, match='removed from DeepSpeed in 0.19.8'):
            OPTIMIZERS.build(dict(type='OnebitAdam', params=[]))


def test_deepspeed_onebit_optimizers_is_a_no_op_where_deepspeed_has_them(monkeypatch):
    monkeypatch.delitem(sys.modules, 'deepspeed.runtime.fp16.onebit', raising=False)
    monkeypatch.setattr(compat.osp, 'exists', lambda path: True)  # the module is on disk
    compat.deepspeed_onebit_optimizers()
    assert 'deepspeed.runtime.fp16.onebit' not in sys.modules
    present = types.ModuleType('deepspeed.runtime.fp16.onebit')
    monkeypatch.setitem(sys.modules, 'deepspeed.runtime.fp16.onebit', present)
    compat.deepspeed_onebit_optimizers()
    assert sys.modules['deepspeed.runtime.fp16.onebit'] is present


XTUNER_IMPORTS = '''
import sys
import transformers
try:
    import xtuner.utils
    bare = 'ok'
except ImportError as error:
    bare = str(error)
for name in [m for m in sys.modules if m.startswith('xtuner')]:
    del sys.modules[name]
from mllm.engine.loops import TrainLoop
from mllm.datasets.samplers import LengthGroupedSampler
import mllm.bench.benchmark
from xtuner.engine.runner import TrainLoop as XTunerTrainLoop
from xtuner.model import LLaVAModel
from xtuner.dataset import LLaVADataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
from xtuner.dataset.huggingface import process_hf_dataset
from xtuner.dataset.samplers import LengthGroupedSampler as XTunerSampler
from xtuner.utils import PROMPT_TEMPLATE
assert issubclass(TrainLoop, XTunerTrainLoop) and LengthGroupedSampler is XTunerSampler
print('BARE', transformers.__version__.split('.')[0], bare)
'''


def test_xtuner_imports_through_mllm_in_a_fresh_process():
    """What mllm takes from XTuner loads after ``mllm.engine.loops`` /
    ``mllm.datasets.samplers`` / ``mllm.bench.benchmark`` (which apply the patches first);
    without them, transformers 5 fails that import (the patch's upstream reason)."""
    out = subprocess.run([sys.executable, '-c', XTUNER_IMPORTS], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    major, bare = out.stdout.split('BARE ')[-1].strip().split(' ', 1)
    if int(major) >= 5:
        assert 'is_safetensors_available' in bare
    else:
        assert bare == 'ok'


@pytest.mark.parametrize('seed', [0, 3])
def test_length_grouped_sampler_order_is_the_old_pins_order(seed):
    from mllm.datasets.samplers import LengthGroupedSampler

    class Lengths:
        modality_length = [(-1) ** i * (3 * i % 17 + 1) for i in range(40)]

        def __len__(self):
            return 40

    sampler = LengthGroupedSampler(Lengths(), per_device_batch_size=4, seed=seed,
                                   length_property='modality_length')
    for epoch, want in enumerate(OLD_PINS_ORDER[str(seed)]):
        sampler.set_epoch(epoch)
        assert list(sampler) == want


def test_clip_tower_loads_state_dicts_of_either_transformers_layout():
    """transformers 5's CLIPVisionModel lost its ``vision_model`` wrapper, so checkpoints
    written under 4.x name the tower ``vision_encoder.model.vision_model.*``: both layouts
    load strictly into the running release's tower, with the same weights. (Checked once
    by hand: an iter_2.pth written under the old pins gives bit-identical logits here.)"""
    import torch

    from mllm.models import CLIPVisionEncoder

    from conftest import TINY_CLIP_CONFIG
    torch.manual_seed(0)
    source = CLIPVisionEncoder(config=TINY_CLIP_CONFIG)
    state = source.state_dict()
    flat = hasattr(source.model, 'vision_model') is False
    other = {(k.replace('model.', 'model.vision_model.', 1) if flat
              else k.replace('model.vision_model.', 'model.', 1)): v for k, v in state.items()}
    assert set(other) != set(state)
    for checkpoint in (state, other):
        torch.manual_seed(1)
        target = CLIPVisionEncoder(config=TINY_CLIP_CONFIG)
        target.load_state_dict(dict(checkpoint), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(),
                                                     state.values()))


def test_a_checkpoint_written_under_the_old_pins_loads_with_the_same_logits():
    """Item 5 of issue 22: tests/fixtures/old_pins was written once under transformers 4.48
    (mllm 1d65512, its CLIP tower under ``vision_model.*``): a full tiny-LLaVA state dict in
    the checksummed checkpoint format, and its logits on fixed inputs. On the current stack it
    loads strictly (no missing or unexpected key) through the safe loader and gives the same
    logits."""
    import json
    import os

    import torch
    from mmengine.config import Config

    from mllm.inference.inference import load_model
    folder = os.path.join(os.path.dirname(__file__), 'fixtures', 'old_pins')
    with open(os.path.join(folder, 'model_config.json')) as f:
        cfg = Config(dict(model=json.load(f)))
    model = load_model(cfg, os.path.join(folder, 'iter_1.pth'))
    expected = torch.load(os.path.join(folder, 'expected.pth'), weights_only=True)
    with torch.no_grad():
        out = model(input_ids=expected['input_ids'], pixel_values=expected['pixel_values'],
                    mode='tensor')
    logits = out['logits'] if isinstance(out, dict) else out
    assert (logits - expected['logits']).abs().max() < 1e-5
