"""The lmms-eval adapter (mllm.evaluation.lmms_eval_adapter) on a tiny exported model.

lmms-eval is optional and not installed here, so most tests put a stand-in for the three
modules the adapter imports into ``sys.modules``; it copies the signatures of lmms-eval 0.7.3
(``lmms_eval/api/{model,instance,registry}.py``). The last tests run against the real package
when it is installed (``pip install -r requirements-lmms-eval.txt``), end to end on a local
task, and are skipped otherwise.
"""
import abc
import importlib
import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from test_chat_export import save_checkpoint, tiny_cfg

ADAPTER = 'mllm.evaluation.lmms_eval_adapter'
QUESTION = 'What colour is the shape?'


# ---------------------------------------------------------------- lmms_eval stand-in

def _stand_in_modules() -> dict:
    """``lmms_eval.api.{model,instance,registry}`` and a 0.5-style ``lmms_eval.models``."""

    class lmms(abc.ABC):  # lmms_eval/api/model.py
        is_simple: bool = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.cache_hook, self.task_dict = None, {}

        @abc.abstractmethod
        def loglikelihood(self, requests):
            pass

        @abc.abstractmethod
        def generate_until(self, requests):
            pass

        @abc.abstractmethod
        def generate_until_multi_round(self, requests):
            pass

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            additional_config = {} if additional_config is None else additional_config
            args = {}
            for pair in filter(None, arg_string.split(',')):
                key, value = pair.split('=', 1)
                args[key] = int(value) if value.isdigit() else value  # utils.handle_arg_string
            args2 = {k: v for k, v in additional_config.items() if v is not None}
            return cls(**args, **args2)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    @dataclass
    class Instance:  # lmms_eval/api/instance.py
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=dict)
        resps: list = field(default_factory=list)
        task_name: str = None
        doc_id: str = None
        repeats: str = None

        def __post_init__(self) -> None:
            self.task_name, self.doc_id, self.repeats = (
                self.metadata['task'], self.metadata['doc_id'], self.metadata['repeats'])

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    registry = {}

    def register_model(*names):  # lmms_eval/api/registry.py
        def decorate(cls):
            for name in names:
                assert issubclass(cls, lmms), f"Model '{name}' must extend lmms class"
                registry[name] = cls
            return cls
        return decorate

    def unwrap_generation_output(output):  # 0.7's api/instance.py: all but text -> str
        return (output, None) if isinstance(output, str) else (str(output), None)

    modules = {name: types.ModuleType(name) for name in (
        'lmms_eval', 'lmms_eval.api', 'lmms_eval.api.model', 'lmms_eval.api.instance',
        'lmms_eval.api.registry', 'lmms_eval.models', 'lmms_eval.evaluator')}
    modules['lmms_eval.evaluator'].unwrap_generation_output = unwrap_generation_output
    modules['lmms_eval.api.model'].lmms = lmms
    modules['lmms_eval.api.instance'].Instance = Instance
    modules['lmms_eval.api.registry'].register_model = register_model
    modules['lmms_eval.api.registry'].MODEL_REGISTRY = registry
    modules['lmms_eval.models'].AVAILABLE_SIMPLE_MODELS = {}  # lmms-eval 0.3-0.5
    return modules


@pytest.fixture(scope='module')
def lmms_eval():
    """The adapter module imported against the stand-in; everything removed afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for name, module in _stand_in_modules().items():
            patch.setitem(sys.modules, name, module)
        patch.delitem(sys.modules, ADAPTER, raising=False)
        adapter = importlib.import_module(ADAPTER)
        yield types.SimpleNamespace(adapter=adapter, modules=sys.modules.copy())
    sys.modules.pop(ADAPTER, None)


def request(lmms_eval, request_type, args, doc_id=0):
    Instance = lmms_eval.modules['lmms_eval.api.instance'].Instance
    return Instance(request_type, args, idx=0,
                    metadata=dict(task='toy', doc_id=doc_id, repeats=1))


# ---------------------------------------------------------------- a tiny exported model

@pytest.fixture(scope='module')
def exported(tmp_path_factory, tiny_tokenizer):
    from mllm.inference.export import export_pretrained

    root = tmp_path_factory.mktemp('lmms')
    tiny_tokenizer.save_pretrained(str(root / 'tokenizer'))
    cfg = tiny_cfg(str(root / 'tokenizer'))
    export_pretrained(cfg, str(root / 'export'), checkpoint=save_checkpoint(cfg, root / 'i.pth'))
    return str(root / 'export')


@pytest.fixture(scope='module')
def docs():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
             for shape in ((48, 80, 3), (40, 40, 3), (30, 20, 3))]
    return [dict(image=noise[0]), dict(image=noise[1]), dict(image=noise[2].convert('L')),
            dict(image=None), dict(images=noise[:2])]


@pytest.fixture(scope='module')
def lm(lmms_eval, exported, docs):
    model = lmms_eval.adapter.MLLMLmms.create_from_arg_string(
        f'pretrained={exported},max_new_tokens=6',
        dict(batch_size=1, max_batch_size=None, device='cpu'))  # what the evaluator adds
    model.task_dict = {'toy': {'test': docs}}
    return model


def one_image(doc):
    return [doc['image']] if doc['image'] is not None else []


def chat_answer(model, image, question, max_new_tokens=6):
    """What `mllm chat` answers: prompt_inputs + generate_reply (greedy)."""
    from mllm.inference.inference import generate_reply, prompt_inputs

    value = f'<image>\n{question}' if image is not None else question
    batch = prompt_inputs([{'from': 'human', 'value': value}], model.tokenizer, model.template,
                          model.image_processor, image.convert('RGB') if image else None)
    return generate_reply(model.model, model.tokenizer, model.template, batch, max_new_tokens)


@pytest.fixture(scope='module')
def chat_answers(lm, docs):
    """`mllm chat`'s answers to QUESTION about docs 0-3 (doc 3 has no image)."""
    return [chat_answer(lm, doc['image'], QUESTION) for doc in docs[:4]]


def generate(lmms_eval, lm, doc_ids, **gen_kwargs):
    gen_kwargs.setdefault('max_new_tokens', 6)
    return lm.generate_until([
        request(lmms_eval, 'generate_until', (QUESTION, gen_kwargs, one_image, i, 'toy', 'test'), i)
        for i in doc_ids])


# ---------------------------------------------------------------- tests

def test_registration_model_args_and_import_guard(lmms_eval, lm, exported, monkeypatch):
    adapter = lmms_eval.adapter
    assert lmms_eval.modules['lmms_eval.api.registry'].MODEL_REGISTRY['mllm'] is adapter.MLLMLmms
    assert lm.batch_size == 1 and lm.max_new_tokens == 6 and str(lm.device) == 'cpu'
    adapter.register()  # the launcher's in-process registration (0.3-0.5 style here)
    assert lmms_eval.modules['lmms_eval.models'].AVAILABLE_SIMPLE_MODELS['mllm'] == (
        'mllm.evaluation.lmms_eval_adapter.MLLMLmms')
    with pytest.raises(TypeError, match=r"unknown model_args \['max_new_token'\]"):
        adapter.MLLMLmms.create_from_arg_string(f'pretrained={exported},max_new_token=3')
    with pytest.raises(ValueError, match="dtype must be one of .* got 'bf16'"):
        adapter.MLLMLmms.create_from_arg_string(f'pretrained={exported},dtype=bf16')
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        adapter.MLLMLmms.create_from_arg_string(f'pretrained={exported}', dict(batch_size='auto'))
    with pytest.raises(FileNotFoundError, match='not an exported model folder'):
        adapter.MLLMLmms.create_from_arg_string(f'pretrained={exported}/llm')
    with pytest.raises(NotImplementedError, match='generate_until_multi_round'):
        lm.generate_until_multi_round([])
    # the evaluator keeps loglikelihood pairs instead of stringifying them
    unwrap = lmms_eval.modules['lmms_eval.evaluator'].unwrap_generation_output
    assert unwrap((0.5, True)) == ((0.5, True), None) and unwrap('a b') == ('a b', None)
    # without lmms-eval the module says how to get it (import mllm itself never needs it)
    for name in _stand_in_modules():
        monkeypatch.setitem(sys.modules, name, None)  # None: import fails
    monkeypatch.delitem(sys.modules, ADAPTER)
    with pytest.raises(ImportError, match='pip install lmms-eval'):
        importlib.import_module(ADAPTER)
    monkeypatch.setitem(sys.modules, ADAPTER, adapter)


@pytest.mark.parametrize('batch_size', [1, 2])
def test_generate_until_answers_as_mllm_chat(lmms_eval, lm, chat_answers, batch_size,
                                             monkeypatch):
    monkeypatch.setattr(lm, 'batch_size', batch_size)
    assert generate(lmms_eval, lm, range(4)) == chat_answers
    expected = chat_answers
    assert all(len(a.split()) >= 3 for a in expected)  # long enough for the `until` test
    assert len(set(expected)) > 1  # the image matters


def test_until_truncates_and_sampling_needs_temperature(lmms_eval, lm, chat_answers):
    full = chat_answers[0]
    words = full.split()
    stop = ' ' + words[2]
    assert generate(lmms_eval, lm, [0], until=[stop])[0] == full.split(stop)[0].strip()
    assert generate(lmms_eval, lm, [0], until=stop, temperature=0)[0] == full.split(stop)[0]
    assert generate(lmms_eval, lm, [0], until=['', 'no such words'])[0] == full
    assert generate(lmms_eval, lm, [0], max_new_tokens=1)[0] == words[0]
    torch.manual_seed(0)
    torch.manual_seed(0)
    assert generate(lmms_eval, lm, [0], temperature=5.0)[0] != full  # temperature > 0 samples


def reference_logprob(lm, doc, continuation_ids):
    """Sum of log-probs of ``continuation_ids`` after the chat prompt, from the logits."""
    from mllm.inference.inference import prompt_inputs

    batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{QUESTION}'}], lm.tokenizer,
                          lm.template, lm.image_processor, doc['image'])
    ids = torch.cat([batch['input_ids'][0], continuation_ids])[None]
    with torch.no_grad():
        logits = lm.model(ids, attention_mask=torch.ones_like(ids),
                          pixel_values=batch['pixel_values'], mode='tensor')
    n = len(continuation_ids)
    logprobs = logits[0, -n - 1:-1].log_softmax(-1)
    return float(logprobs[torch.arange(n), continuation_ids].sum())


def test_loglikelihood_is_the_mean_token_loss_and_flags_greedy(lmms_eval, lm, docs):
    from mllm.datasets.templates import stop_token_id
    from mllm.inference.inference import prompt_inputs

    doc = docs[0]
    batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{QUESTION}'}], lm.tokenizer,
                          lm.template, lm.image_processor, doc['image'])
    greedy = lm.model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                               pixel_values=batch['pixel_values'], max_new_tokens=4,
                               eos_token_id=stop_token_id(lm.tokenizer, lm.template),
                               pad_token_id=lm.tokenizer.pad_token_id)[0]
    assert len(greedy) == 4  # no end token within 4 tokens (the tiny head never emits it)
    text = lm.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    wrong = ' '.join(reversed(text.split()))
    assert wrong != text
    args = [(QUESTION, target, one_image, 0, 'toy', 'test')
            for target in (text, ' ' + text, lambda d: text, wrong)]
    results = lm.loglikelihood([request(lmms_eval, 'loglikelihood', a) for a in args])
    # lmms-eval's convention (its multiple_choice takes argmin): the mean token loss
    expected = -reference_logprob(lm, doc, greedy) / len(greedy)
    for loss, is_greedy in results[:3]:  # ' ' + text: lmms-eval's target_delimiter
        assert is_greedy is True
        assert loss == pytest.approx(expected, rel=1e-6) and loss > 0
    loss, is_greedy = results[3]
    assert is_greedy is False and loss > expected + 0.1


@pytest.mark.parametrize('case', ['two_images', 'video'])
def test_unsupported_visuals_fail_naming_the_doc(lmms_eval, lm, case):
    visual = (lambda d: d['images']) if case == 'two_images' else (lambda d: ['clip.mp4'])
    with pytest.raises(ValueError, match='toy/test/doc 4: (2 images|doc_to_visual gave)'):
        lm.generate_until([request(lmms_eval, 'generate_until',
                                   (QUESTION, {}, visual, 4, 'toy', 'test'), 4)])


def test_launcher_registers_the_model_and_fails_when_an_evaluation_fails(lmms_eval, monkeypatch,
                                                                          capsys):
    """``python -m mllm.evaluation.lmms_eval_adapter ARGS`` runs lmms-eval's CLI (a stand-in here
    that, like lmms-eval 0.7.3, logs evaluation errors and returns normally)."""
    evaluator, seen = lmms_eval.modules['lmms_eval.evaluator'], []

    def simple_evaluate(model, model_args):
        seen.append(lmms_eval.modules['lmms_eval.models'].AVAILABLE_SIMPLE_MODELS.get(model))
        if 'bad' in model_args:
            raise ValueError('no such folder')

    def cli_main():
        try:
            evaluator.simple_evaluate(sys.argv[2], sys.argv[4])
        except Exception:
            pass  # lmms-eval's cli_evaluate: traceback.print_exc() and go on

    monkeypatch.setattr(evaluator, 'simple_evaluate', simple_evaluate, raising=False)
    monkeypatch.setitem(sys.modules, 'lmms_eval.cli', types.ModuleType('lmms_eval.cli'))
    dispatch = types.ModuleType('lmms_eval.cli.dispatch')
    dispatch.main = cli_main
    monkeypatch.setitem(sys.modules, 'lmms_eval.cli.dispatch', dispatch)
    monkeypatch.setattr(sys, 'argv', ['adapter'])
    main = lmms_eval.adapter.main
    assert main(['--model', 'mllm', '--model_args', 'pretrained=good']) == 0
    assert main(['--model', 'mllm', '--model_args', 'pretrained=bad']) == 1
    assert seen == ['mllm.evaluation.lmms_eval_adapter.MLLMLmms'] * 2
    assert "evaluation failed: ValueError('no such folder')" in capsys.readouterr().err
    assert evaluator.simple_evaluate is simple_evaluate  # restored


@pytest.fixture
def without_stand_in():
    """sys.modules without the stand-in (nor the adapter imported against it), restored after."""
    def ours(name):
        return name == ADAPTER or name == 'lmms_eval' or name.startswith('lmms_eval.')

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [k for k in sys.modules if ours(k)]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_with_the_real_lmms_eval(without_stand_in, exported, docs, chat_answers):
    """The real package, when installed: its base class, Instance, and model resolution."""
    pytest.importorskip('lmms_eval')
    from lmms_eval import evaluator
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms

    adapter = importlib.import_module(ADAPTER)
    assert issubclass(adapter.MLLMLmms, lmms)
    adapter.register()
    import lmms_eval.models
    assert lmms_eval.models.get_model('mllm') is adapter.MLLMLmms
    lm = adapter.MLLMLmms.create_from_arg_string(
        f'pretrained={exported}', dict(batch_size=1, max_batch_size=None, device='cpu'))
    lm.task_dict = {'toy': {'test': docs}}
    assert evaluator.unwrap_generation_output((0.5, False)) == ((0.5, False), None)
    instance = Instance('generate_until', (QUESTION, {'max_new_tokens': 6}, one_image, 0, 'toy',
                                           'test'), idx=0,
                        metadata=dict(task='toy', doc_id=0, repeats=1))
    assert lm.generate_until([instance]) == chat_answers[:1]


# ---------------------------------------------------------------- the real lmms-eval, end to end

HAS_LMMS_EVAL = importlib.util.find_spec('lmms_eval') is not None  # before any stand-in
NO_LMMS_EVAL = ('lmms-eval is not installed (optional: `.venv/bin/pip install -r '
                'requirements-lmms-eval.txt`)')
TASK_YAML = """task: toy_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
TASK_UTILS = """import os
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(os.path.join(os.path.dirname(__file__), doc['image'])).convert('RGB')]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc['question']
"""
TASK_QUESTIONS = ['What colour is the shape?', 'Describe this image.', 'How many are there?',
                  'Is it red?']


@pytest.fixture(scope='module')
def local_task(tmp_path_factory):
    """A local lmms-eval task (``--include_path``): four images (square, wide, tall, larger),
    a JSON dataset read by ``datasets`` offline."""
    root = tmp_path_factory.mktemp('task')
    rng = np.random.default_rng(0)
    docs = []
    for i, ((h, w), question) in enumerate(zip([(64, 64), (40, 64), (64, 48), (128, 128)],
                                               TASK_QUESTIONS)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f'{i}.png')
        docs.append(dict(image=f'{i}.png', question=question, answer='red'))
    (root / 'docs.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (root / 'toy.yaml').write_text(TASK_YAML.format(docs=root / 'docs.jsonl'))
    (root / 'toy_utils.py').write_text(TASK_UTILS)
    return dict(root=str(root), images=[str(root / d['image']) for d in docs])


@pytest.fixture(scope='module')
def both_exports(tmp_path_factory, tiny_tokenizer):
    """One checkpoint exported twice: mllm's format and transformers' LLaVA layout."""
    from mllm.cli import main

    root = tmp_path_factory.mktemp('lmms_routes')
    tiny_tokenizer.save_pretrained(str(root / 'tokenizer'))
    options = ['--cfg-options', f'tokenizer.pretrained={root / "tokenizer"}']
    ckpt = save_checkpoint(tiny_cfg(str(root / 'tokenizer')), root / 'iter_1.pth')
    config = 'configs/tiny/tiny_llava_synthetic.py'
    for fmt in ('mllm', 'llava_hf'):
        assert main(['convert', 'pth-to-hf', config, ckpt, str(root / fmt), '--format', fmt,
                     *options]) == 0
    return dict(mllm=str(root / 'mllm'), llava_hf=str(root / 'llava_hf'))


def run_lmms_eval(launcher, model, model_args, task, out_dir):
    """One lmms-eval run in a fresh process; the answers of its sample log, by doc id."""
    import glob
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    done = subprocess.run(
        [sys.executable, '-m', launcher, '--model', model, '--model_args', model_args,
         '--tasks', 'toy_vqa', '--include_path', task['root'], '--batch_size', '1',
         '--output_path', str(out_dir), '--log_samples'],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = glob.glob(os.path.join(out_dir, '*', '*_samples_toy_vqa.jsonl'))
    assert len(samples) == 1, done.stderr[-3000:]
    with open(samples[0]) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda row: row['doc_id'])
    answers = [row['filtered_resps'] for row in rows]  # a string, or [string] per filter
    return [a if isinstance(a, str) else a[0] for a in answers]


@pytest.fixture(scope='module')
def task_chat_answers(both_exports, local_task):
    """``mllm chat``'s answers to the task's questions (lmms-eval's LLaVA layout: the image
    first, then a newline)."""
    from mllm.inference.export import load_pretrained
    from mllm.inference.inference import generate_reply, load_image, prompt_inputs

    model, tokenizer, processor, template = load_pretrained(both_exports['mllm'])
    answers = []
    for question, image in zip(TASK_QUESTIONS, local_task['images']):
        batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{question}'}], tokenizer,
                              template, processor, load_image(image))
        answers.append(generate_reply(model, tokenizer, template, batch, max_new_tokens=6))
    assert all(answers)
    return answers


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason=NO_LMMS_EVAL)
@pytest.mark.parametrize('route', ['adapter_launcher', 'lmms_eval_entry_point', 'llava_hf'])
def test_real_lmms_eval_runs_a_local_task(route, both_exports, local_task, task_chat_answers,
                                          tmp_path):
    """Every way to run lmms-eval on a trained model answers as ``mllm chat``:
    ``python -m mllm.evaluation.lmms_eval_adapter --model mllm``, ``python -m lmms_eval
    --model mllm`` (the ``lmms_eval.models`` entry point of setup.py) and lmms-eval's own
    ``llava_hf`` model on the ``--format llava_hf`` export."""
    if route == 'lmms_eval_entry_point':
        from importlib.metadata import entry_points
        found = [ep.value for ep in entry_points(group='lmms_eval.models') if ep.name == 'mllm']
        assert found == ['mllm.evaluation.lmms_eval_adapter:manifest'], (
            f'installed entry point {found}: reinstall mllm (`pip install --no-deps -e .`)')
    if route == 'llava_hf':
        # lmms-eval's default device_map '' is refused by transformers 5: name the device
        answers = run_lmms_eval('lmms_eval', 'llava_hf', f'pretrained={both_exports["llava_hf"]},'
                                'device=cpu,device_map=cpu,dtype=float32', local_task, tmp_path)
    else:
        launcher = ('mllm.evaluation.lmms_eval_adapter' if route == 'adapter_launcher'
                    else 'lmms_eval')
        answers = run_lmms_eval(launcher, 'mllm', f'pretrained={both_exports["mllm"]}',
                                local_task, tmp_path)
    assert answers == task_chat_answers
