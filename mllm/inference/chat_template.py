"""mllm's chat templates (``mllm.datasets.templates``) as Jinja ``chat_template`` strings, so
transformers' ``apply_chat_template`` (processor or tokenizer), lmms-eval's ``llava_hf``, vLLM
and SGLang render the text the model was trained on.

The Jinja text is generated from the ``ChatTemplate`` fields (system block, user/assistant
headers, reply prefix, end-of-turn, separator, 'plain''s image-only turns, ``image_first``,
XTuner's BOS per turn), not written per recipe. ``check_chat_template`` (run by every export)
renders probe conversations with it, encodes them as ``processor(text=...)`` does and raises
unless the ids equal those of mllm's own prompt builder, so a template change the generator
does not know fails the export instead of drifting.

Messages follow transformers' convention: ``role`` is 'system' (first only), 'user' or
'assistant'; ``content`` is a string (``<image>`` where an image goes, as in LLaVA data) or a
list of ``{'type': 'image'}`` / ``{'type': 'text', 'text': ...}`` items joined with '\\n' (so
``[image, text]`` renders as LLaVA's ``'<image>\\nquestion'``). The BOS token is left to the
tokenizer when it adds one itself (as every HF Llama does).
"""
import json
from typing import List, Sequence

from mllm.datasets.templates import IMAGE_TOKEN, ChatTemplate, get_template


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def _emit(text: str) -> str:
    return '{{- ' + _lit(text) + ' -}}' if text else ''


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts the ids with its BOS token by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer('a')['input_ids'][:1] == [bos]


def jinja_chat_template(template, bos_in_text: bool = False, image_suffix: str = '',
                        answer_prefix: str = '') -> str:
    """The Jinja ``chat_template`` that renders ``template`` (a ChatTemplate or its name).

    Args:
        bos_in_text: start the text with ``bos_token``, for a template that has BOS and a
            tokenizer that does not add it itself (``not adds_bos(tokenizer)``; e.g. a bare
            Llama-3 ``tokenizer.json``). Defaults to False.
        image_suffix, answer_prefix: text after every ``<image>`` / before every answer that
            makes whole-text encoding give the ids of piece-wise encoding (see
            ``fit_chat_template``). Default to ''.
    """
    t = get_template(template)
    image = _lit(IMAGE_TOKEN)
    end = '{{- eos_token -}}' if t.end is None else _emit(t.end)
    bos_per_turn = ''
    if getattr(t, 'encoding', 'pieces') == 'xtuner' and t.end is None and t.bos:
        # XTuner's encode_fn: an answer ending in EOS is followed by BOS on the next turn
        # (the tokenizer adds the first one)
        bos_per_turn = '{%- if not loop.first -%}{{- bos_token -}}{%- endif -%}'
    user_head, user_tail = t.user.split('{input}')
    sys_head, sys_tail = t.system.split('{system}') if t.system else ('', '')
    if t.keep_user_text and getattr(t, 'image_first', False):
        user_text = 'image_first(text)'
    elif t.keep_user_text:
        user_text = 'text'
    else:  # LLaVA 'plain': only the user's image placeholders are kept
        user_text = _lit(IMAGE_TOKEN) + ' * text.count(' + _lit(IMAGE_TOKEN) + ')'
    if image_suffix:
        user_text = f'({user_text}) | replace({image}, {_lit(IMAGE_TOKEN + image_suffix)})'
    user_text = '{{- ' + user_text + ' -}}'
    parts = [
        # content: a string, or image/text items joined with newlines
        '{%- macro content_text(message) -%}',
        '{%- if message["content"] is string -%}{{- message["content"] -}}',
        '{%- else -%}{%- for item in message["content"] -%}',
        '{%- if not loop.first -%}{{- "\\n" -}}{%- endif -%}',
        '{%- if item["type"] == "image" -%}' + _emit(IMAGE_TOKEN),
        '{%- elif item["type"] == "text" -%}{{- item["text"] -}}',
        '{%- else -%}{{- raise_exception("unsupported content type " + item["type"]) -}}',
        '{%- endif -%}{%- endfor -%}{%- endif -%}',
        '{%- endmacro -%}',
        # mllm.datasets.templates._image_first: the image block to the front, then '\\n'
        '{%- macro image_first(text) -%}{%- set first = text.find(' + image + ') -%}',
        '{%- if first < 0 -%}{{- text -}}{%- else -%}',
        '{%- set last = text.rfind(' + image + ') + ' + str(len(IMAGE_TOKEN)) + ' -%}',
        '{%- set ns = namespace(words=false) -%}',
        '{%- for c in text[first:last].replace(' + image + ', "") -%}',
        '{%- if c.isalnum() -%}{%- set ns.words = true -%}{%- endif -%}{%- endfor -%}',
        '{%- if ns.words -%}{{- text -}}{%- else -%}',
        '{{- (text[first:last] + "\\n" + (text[:first] + text[last:]).strip()).strip() -}}',
        '{%- endif -%}{%- endif -%}{%- endmacro -%}',
        '{%- set system = ' + _lit(t.default_system) + ' -%}',
        '{%- set turns = messages -%}',
        '{%- if messages and messages[0]["role"] == "system" -%}',
        '{%- set system = content_text(messages[0]) -%}{%- set turns = messages[1:] -%}',
        '{%- endif -%}',
    ]
    if t.single_turn:
        parts.append('{%- if turns | length > 2 -%}{{- raise_exception("template ' + t.name
                     + ' takes one user/assistant exchange") -}}{%- endif -%}')
    if bos_in_text and t.bos:
        parts.append('{{- bos_token -}}')
    if t.system:
        parts.append('{%- if system -%}' + _emit(sys_head) + '{{- system -}}' + _emit(sys_tail)
                     + '{%- endif -%}')
    parts += [
        '{%- for message in turns -%}',
        '{%- set expected = "user" if loop.index0 % 2 == 0 else "assistant" -%}',
        '{%- if message["role"] != expected -%}{{- raise_exception("expected a " + expected'
        ' + " message, got " + message["role"] + " (roles alternate user/assistant)") -}}'
        '{%- endif -%}',
        '{%- set text = content_text(message) -%}',
        '{%- if message["role"] == "user" -%}' + bos_per_turn + _emit(user_head) + user_text
        + _emit(user_tail),
        # mllm puts the assistant header after every user turn; HF adds it for the answer
        # that follows or, for the last user turn, with add_generation_prompt
        '{%- if not loop.last or add_generation_prompt -%}' + _emit(t.assistant) + '{%- endif -%}',
        '{%- else -%}' + _emit(t.reply_prefix + answer_prefix) + '{{- text -}}' + end
        + _emit(t.sep),
        '{%- endif -%}',
        '{%- endfor -%}',
    ]
    return ''.join(parts)


def _probe_conversations(template: ChatTemplate) -> List[list]:
    """Conversations that exercise every part of a template (system, images, answers)."""
    one = [{'from': 'human', 'value': f'{IMAGE_TOKEN}\nWhat is it?'}]
    two = one + [{'from': 'gpt', 'value': 'A cat.'}]
    probes = [one, two, [{'from': 'human', 'value': f'Text first. {IMAGE_TOKEN}'}]]
    if not template.single_turn:
        probes += [two + [{'from': 'human', 'value': 'And its colour?'}],
                   [{'from': 'system', 'value': 'Be brief.'}] + two
                   + [{'from': 'human', 'value': 'And now?'}, {'from': 'gpt', 'value': 'No.'}]]
    return probes


def to_messages(conversation: Sequence[dict]) -> List[dict]:
    """LLaVA turns (``from``/``value``) as transformers chat messages (``role``/``content``)."""
    roles = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant',
             'assistant': 'assistant'}
    return [{'role': roles[turn['from']], 'content': turn['value']} for turn in conversation]


def check_chat_template(template, jinja: str, tokenizer) -> None:
    """Raise ``ValueError`` unless, on probe conversations, ``tokenizer`` encoding the text
    ``jinja`` renders (as ``processor(text=...)`` does, one ``<image>`` per image) gives the
    ids of mllm's prompt builder (``build_generation_prompt``; ``encode_conversation`` for a
    conversation ending with an answer)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from mllm.datasets.templates import (IMAGE_TOKEN_INDEX, build_generation_prompt,
                                         encode_conversation)

    t = get_template(template)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for conversation in _probe_conversations(t):
        generation = conversation[-1]['from'] == 'human'
        if generation:
            expected = build_generation_prompt(conversation, tokenizer, t, num_image_tokens=1)
        else:
            expected = encode_conversation(conversation, tokenizer, t,
                                           num_image_tokens=1)['input_ids']
        expected = [image_id if i == IMAGE_TOKEN_INDEX else i for i in expected]
        rendered, _ = render_jinja_template(
            conversations=[to_messages(conversation)], chat_template=jinja,
            add_generation_prompt=generation, **tokenizer.special_tokens_map)
        got = tokenizer(rendered[0])['input_ids']
        if got != expected:
            raise ValueError(
                f'the exported chat template of {t.name!r} renders {rendered[0]!r}, which '
                f'encodes as {got} where mllm prompts {expected} (from '
                f'{tokenizer.decode(expected)!r}); mllm/inference/chat_template.py does not '
                'know this template or tokenizer')


def fit_chat_template(template, tokenizer) -> str:
    """The Jinja chat template for ``template`` whose whole-text encoding by ``tokenizer``
    (what ``processor(text=...)`` does) gives mllm's prompt ids.

    mllm encodes as the template's own system did: LLaVA splits the text at every image and
    encodes each chunk with the tokenizer's prefix space (``tokenizer_image_token``), XTuner
    encodes every answer on its own. A SentencePiece tokenizer encoding the whole text puts no
    prefix space after a special token when it is non-legacy (Vicuna-1.5's), nor before an
    answer glued to 'ASSISTANT:'; writing that space into the text gives the same ids. The
    first variant that passes ``check_chat_template`` is returned (none needed for byte-level
    tokenizers); if none does, its error is raised.
    """
    bos_in_text = not adds_bos(tokenizer)
    error = None
    for image_suffix in ('', ' '):
        for answer_prefix in ('', ' '):
            jinja = jinja_chat_template(template, bos_in_text, image_suffix, answer_prefix)
            try:
                check_chat_template(template, jinja, tokenizer)
                return jinja
            except ValueError as err:
                error = error or err
    raise error
