"""Using a trained model: chat prompts equal the training encoding, the exported folder
(mllm and transformers-LLaVA layouts, with LoRA merged or kept) gives the training model's
logits, and CLI errors are clear with non-zero exits."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.cli import main
from mllm.engine.config import load_config

TINY = 'configs/tiny/tiny_llava_synthetic.py'
LORA = dict(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp('images') / 'noise.png')
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)  # not square
    return path


def tiny_cfg(tokenizer_dir, lora=None, config=TINY):
    options = {'tokenizer.pretrained': tokenizer_dir}
    if lora:
        options['model.lora'] = lora
    return load_config(config, options)


def save_checkpoint(cfg, path, seed=0):
    """A 'trained' tiny model: random weights, LoRA B non-zero so merging matters, and only
    the tokenizer's words (no special or out-of-vocabulary ids) ever win the argmax, so
    generated answers decode to text."""
    from mllm.models.llms import build_tokenizer
    from mllm.registry import MODELS

    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    for name, param in model.named_parameters():
        if 'lora_B' in name:
            param.data.normal_(0, 0.2)
    with torch.no_grad():
        head = model.llm.get_output_embeddings().weight  # (V, C)
        head[len(build_tokenizer(cfg.tokenizer)):] = 0
        head[:5] = 0  # <unk> <s> </s> <pad> <image>
        head[5:] *= 50  # word logits far from 0, so one of them wins
    torch.save({'state_dict': model.state_dict()}, path)
    return str(path)


def logits(model, batch):
    with torch.no_grad():
        return model(batch['input_ids'], attention_mask=batch['attention_mask'],
                     pixel_values=batch['pixel_values'], mode='tensor')


def sample_batch(tokenizer, template, image_processor, image_path):
    from mllm.inference.inference import load_image, prompt_inputs
    conversation = [{'from': 'human', 'value': '<image>\nWhat colour is the shape?'},
                    {'from': 'gpt', 'value': 'It is red.'},
                    {'from': 'human', 'value': 'How many are there?'}]
    return prompt_inputs(conversation, tokenizer, template, image_processor,
                         load_image(image_path))


# ---------------------------------------------------------------- chat prompt == training

def test_chat_prompt_is_the_training_encoding_of_the_same_turns(tmp_path, tokenizer_dir,
                                                                 image_path):
    from mllm.inference.inference import load_for_inference, load_image, prompt_inputs
    from mllm.registry import DATASETS

    cfg = tiny_cfg(tokenizer_dir)
    ckpt = save_checkpoint(cfg, tmp_path / 'iter_1.pth')
    turns = [{'from': 'human', 'value': '<image>\nWhat colour is the shape?'},
             {'from': 'gpt', 'value': 'It is red.'},
             {'from': 'human', 'value': 'How many are there?'}, {'from': 'gpt', 'value': 'two'}]
    data = tmp_path / 'one.json'
    data.write_text(json.dumps([dict(id='a', image=os.path.basename(image_path),
                                     conversations=turns)]))
    dataset = DATASETS.build(dict(cfg.train_dataloader.dataset, data_path=str(data),
                                  image_folder=os.path.dirname(image_path)))
    trained = dataset[0]
    _, tokenizer, processor, template = load_for_inference(TINY, ckpt, {
        'tokenizer.pretrained': tokenizer_dir})
    assert template.name == 'vicuna_v1'
    image = load_image(image_path)
    answer_starts = [i for i in range(1, len(trained['labels']))
                     if trained['labels'][i] != -100 and trained['labels'][i - 1] == -100]
    assert len(answer_starts) == 2
    for n_turns, start in zip((1, 3), answer_starts):
        batch = prompt_inputs(turns[:n_turns], tokenizer, template, processor, image)
        prompt = batch['input_ids'][0]
        # the chat prompt is the training sequence up to where the answer's labels begin
        assert torch.equal(prompt, trained['input_ids'][:start])
        assert int((prompt == -200).sum()) == 64
        assert torch.equal(batch['pixel_values'][0], trained['pixel_values'])


# ---------------------------------------------------------------- export round trips

@pytest.mark.parametrize('variant', ['full', 'lora_merged', 'lora_adapter'])
def test_export_round_trip_gives_the_training_logits(variant, tmp_path, tokenizer_dir,
                                                     image_path):
    from mllm.inference.export import load_pretrained
    from mllm.inference.inference import load_model

    cfg = tiny_cfg(tokenizer_dir, lora=None if variant == 'full' else LORA)
    ckpt = save_checkpoint(cfg, tmp_path / 'iter_1.pth')
    reference = load_model(cfg, ckpt)
    out = tmp_path / 'export'
    options = ['--cfg-options', f'tokenizer.pretrained={tokenizer_dir}']
    if variant != 'full':
        options += [f'model.lora.r={LORA["r"]}', f'model.lora.alpha={LORA["alpha"]}',
                    'model.lora.dropout=0.0']
    keep = ['--keep-adapter'] if variant == 'lora_adapter' else []
    assert main(['convert', 'pth-to-hf', TINY, ckpt, str(out), *keep, *options]) == 0

    moved = tmp_path / 'moved'  # self-contained: nothing points back at the training files
    shutil.move(str(out), str(moved))
    meta = json.loads((moved / 'mllm_config.json').read_text())
    assert str(tmp_path) not in json.dumps(meta) and tokenizer_dir not in json.dumps(meta)
    assert meta['template'] == 'vicuna_v1' and meta['weights'] == {
        'projector': 'projector.safetensors'}
    assert meta['model']['projector'] == dict(type='MLPProjector', depth=2)  # default, written out
    assert os.path.isdir(moved / 'vision_encoder') and os.path.isdir(moved / 'llm')
    assert os.path.isdir(moved / 'llm_adapter') == (variant == 'lora_adapter')

    model, tokenizer, processor, template = load_pretrained(str(moved))
    batch = sample_batch(tokenizer, template, processor, image_path)
    expected, got = logits(reference, batch), logits(model, batch)
    if variant == 'lora_merged':  # W + s*BA folded into W: equal up to float rounding
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)
    else:
        assert torch.equal(got, expected)
    # the LLM folder alone is a plain transformers checkpoint
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_pretrained(moved / 'llm')
    assert llm.config.hidden_size == 128


def test_export_llava_hf_layout_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir,
                                                                          image_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm.inference.inference import load_for_inference

    cfg = tiny_cfg(tokenizer_dir)
    ckpt = save_checkpoint(cfg, tmp_path / 'iter_1.pth')
    out = tmp_path / 'llava_hf'
    assert main(['convert', 'pth-to-hf', TINY, ckpt, str(out), '--format', 'llava_hf',
                 '--cfg-options', f'tokenizer.pretrained={tokenizer_dir}']) == 0
    ours, tokenizer, processor, template = load_for_inference(
        TINY, ckpt, {'tokenizer.pretrained': tokenizer_dir})
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.vision_feature_layer == -2
    assert hf.config.vision_feature_select_strategy == 'default'
    image_token_id = hf.config.image_token_index
    assert AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids(
        '<image>') == image_token_id

    batch = sample_batch(tokenizer, template, processor, image_path)
    hf_ids = batch['input_ids'].masked_fill(batch['input_ids'] == -200, image_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, attention_mask=batch['attention_mask'],
                    pixel_values=batch['pixel_values']).logits
    expected = logits(ours, batch)
    text = batch['input_ids'][0] != -200
    torch.testing.assert_close(theirs[0, text, :expected.shape[-1]], expected[0, text],
                               rtol=1e-5, atol=1e-5)


def test_llava_hf_export_adds_the_image_token_and_resizes(tmp_path, tokenizer_dir):
    """A tokenizer without ``<image>`` (Vicuna's) gets it at the end of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.inference.export import export_llava_hf
    from mllm.registry import MODELS

    cfg = tiny_cfg(tokenizer_dir)
    cfg.model.llm.config.vocab_size = 8
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    vocab = {w: i for i, w in enumerate(['<unk>', '<s>', '</s>', 'a', 'b', 'c', 'd', 'e'])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<s>', eos_token='</s>',
                                        unk_token='<unk>')
    hf = export_llava_hf(model, tokenizer, LLaVAImageProcessor(64, 8), str(tmp_path / 'out'))
    assert hf.config.image_token_index == 8
    assert hf.get_input_embeddings().num_embeddings == 9
    assert torch.equal(hf.get_input_embeddings().weight[:8],
                       model.llm.get_input_embeddings().weight)


def test_llava_hf_export_refuses_other_architectures(tokenizer_dir):
    from mllm.inference.export import export_llava_hf
    from mllm.registry import MODELS

    cfg = tiny_cfg(tokenizer_dir)
    cfg.model.projector = dict(type='MLPProjector', depth=3)
    with pytest.raises(ValueError, match='2-layer MLP'):
        export_llava_hf(MODELS.build(cfg.model), None, None, 'unused')


# ---------------------------------------------------------------- mllm chat

@pytest.fixture(scope='module')
def exported(tmp_path_factory, tokenizer_dir):
    from mllm.inference.export import export_pretrained

    root = tmp_path_factory.mktemp('chat')
    cfg = tiny_cfg(tokenizer_dir)
    ckpt = save_checkpoint(cfg, root / 'iter_1.pth')
    export_pretrained(cfg, str(root / 'export'), checkpoint=ckpt)
    return dict(ckpt=ckpt, out=str(root / 'export'))


def test_chat_one_shot_streams_the_greedy_answer(exported, image_path, capsys):
    from mllm.inference.export import load_pretrained
    from mllm.inference.inference import generate_reply, load_image, prompt_inputs

    question = 'What colour is the shape?'
    assert main(['chat', exported['out'], '--image', image_path, '--prompt', question,
                 '--max-new-tokens', '6']) == 0
    out = capsys.readouterr().out
    model, tokenizer, processor, template = load_pretrained(exported['out'])
    batch = prompt_inputs([{'from': 'human', 'value': f'<image>\n{question}'}], tokenizer,
                          template, processor, load_image(image_path))
    stream = io.StringIO()
    answer = generate_reply(model, tokenizer, template, batch, max_new_tokens=6, stream=stream)
    assert answer and stream.getvalue().strip() == answer
    assert out == f'ASSISTANT: {stream.getvalue()}'


def test_chat_interactive_is_multi_turn_from_a_config(exported, image_path, tokenizer_dir,
                                                      monkeypatch, capsys):
    monkeypatch.setattr('sys.stdin', io.StringIO('What colour is the shape?\nHow many?\n\n'))
    assert main(['chat', TINY, '--checkpoint', exported['ckpt'], '--image', image_path,
                 '--max-new-tokens', '3', '--cfg-options',
                 f'tokenizer.pretrained={tokenizer_dir}']) == 0
    assert capsys.readouterr().out.count('ASSISTANT: ') == 2


@pytest.mark.parametrize('case', ['missing_checkpoint', 'no_checkpoint', 'image_not_found',
                                  'not_an_image', 'not_an_export'])
def test_chat_errors_are_clear_and_non_zero(case, exported, image_path, tmp_path, capsys):
    model, extra, image = exported['out'], [], image_path
    if case == 'missing_checkpoint':
        model, extra, expected = TINY, ['--checkpoint', str(tmp_path / 'nope.pth')], \
            'checkpoint not found'
    elif case == 'no_checkpoint':
        model, expected = TINY, '--checkpoint PATH'
    elif case == 'image_not_found':
        image, expected = str(tmp_path / 'missing.png'), 'image not found'
    elif case == 'not_an_image':
        image = str(tmp_path / 'notes.txt')
        (tmp_path / 'notes.txt').write_text('hello')
        expected = 'cannot decode image'
    else:
        model, expected = str(tmp_path), 'expected an exported model'
    assert main(['chat', model, *extra, '--image', image, '--prompt', 'hi']) == 1
    assert expected in capsys.readouterr().err


def test_convert_errors(tmp_path, tokenizer_dir, capsys):
    assert main(['convert', 'pth-to-hf', TINY, str(tmp_path / 'nope.pth'),
                 str(tmp_path / 'out')]) == 1
    assert 'checkpoint not found' in capsys.readouterr().err
    ckpt = save_checkpoint(tiny_cfg(tokenizer_dir), tmp_path / 'iter_1.pth')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    assert main(['convert', 'pth-to-hf', TINY, ckpt, str(tmp_path / 'full')]) == 1
    assert 'not empty' in capsys.readouterr().err
    assert main(['convert', 'pth-to-hf', TINY, ckpt, str(tmp_path / 'o'), '--format', 'onnx']) == 2
