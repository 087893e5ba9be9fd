"""Chat templates and the one tokenisation path shared by training and chat.

A conversation in LLaVA's JSON format (``[{'from': 'human', 'value': ...},
{'from': 'gpt', 'value': ...}, ...]``) is rendered into an ordered list of
*segments* -- text that is labelled (assistant answers plus the end-of-turn
token), text that is not (system prompt, user turns, role headers,
separators) and runs of image tokens. ``encode_conversation`` renders the
whole conversation; ``build_generation_prompt`` renders it up to the assistant
prefix of the last turn. Both share ``_render`` and ``_encode`` so the chat
prompt is, token for token, the prefix the model saw in training (the
MG-LLaVA chat/train mismatch cannot happen here).

Encoding is piece-wise: adjacent text of the same kind is joined and
tokenised with ``tokenizer.encode(piece, add_special_tokens=False)``; pieces
break only at image runs and at label boundaries. For byte-level BPE
tokenizers (Llama-3, Qwen, Yi) this equals encoding the whole rendered string
wherever the boundary falls before a space/newline or a special token, which
all templates here arrange. SentencePiece tokenizers with a dummy prefix
(Vicuna, Phi-3) add a leading space per piece, exactly as LLaVA's own
``tokenizer_image_token`` does.

Formats follow LLaVA-1.5 (``vicuna_v1``, ``plain``) and XTuner's
``PROMPT_TEMPLATE`` (``phi3_chat``, ``llama3_chat``, ``qwen_chat``/ChatML).
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

IMAGE_TOKEN = '<image>'  # placeholder in the text of LLaVA JSON data
IMAGE_TOKEN_INDEX = -200  # sentinel id put into input_ids for every visual token
IGNORE_INDEX = -100  # label of every position that is not an answer token

_ROLES = {'human': 'human', 'user': 'human', 'gpt': 'gpt', 'assistant': 'gpt'}


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is laid out as text.

    A human turn renders as ``user.format(input=q) + assistant`` (unlabelled);
    a gpt turn as ``reply_prefix + a + end`` (labelled) followed by ``sep``
    (unlabelled).

    Args:
        name: Template key in ``TEMPLATES``.
        user: Format of a user turn; must contain ``{input}`` once.
        assistant: Assistant prefix (role header) that follows every user
            turn; a generation prompt ends with it.
        system: Format of the system block with ``{system}``; rendered only
            when the system text is non-empty. Defaults to '' (no system).
        default_system: System text used unless the conversation starts with
            a ``system`` turn. Defaults to ''.
        reply_prefix: Text put before every answer inside the labelled span.
            Vicuna uses ' ' so 'ASSISTANT:' ends the prompt, as in LLaVA,
            and the space merges into the answer's first token. Defaults to ''.
        end: End-of-turn string appended to every answer and labelled, so the
            model learns to stop; None means ``tokenizer.eos_token``.
        sep: Unlabelled text after ``end`` (ChatML's and Phi-3's newline).
        bos: Prepend ``tokenizer.bos_token_id`` (skipped if it has none).
        keep_user_text: False drops the user text except its ``<image>``
            placeholders (LLaVA's 'plain' pretraining format).
        single_turn: Only one human/gpt exchange is allowed ('plain').
        stop_words: Strings that end generation.
    """
    name: str
    user: str = '{input}'
    assistant: str = ''
    system: str = ''
    default_system: str = ''
    reply_prefix: str = ''
    end: Optional[str] = None
    sep: str = ''
    bos: bool = True
    keep_user_text: bool = True
    single_turn: bool = False
    stop_words: tuple = ()

    def __post_init__(self):
        if self.user.count('{input}') != 1:
            raise ValueError(f'template {self.name!r}: `user` must contain '
                             f"'{{input}}' exactly once, got {self.user!r}")


_VICUNA_SYSTEM = (
    'A chat between a curious user and an artificial intelligence assistant. '
    "The assistant gives helpful, detailed, and polite answers to the user's "
    'questions.')

_CHATML = ChatTemplate(
    name='chatml',
    system='<|im_start|>system\n{system}<|im_end|>\n',
    user='<|im_start|>user\n{input}<|im_end|>\n',
    assistant='<|im_start|>assistant\n',
    end='<|im_end|>', sep='\n', bos=False,  # Qwen/Yi chat prompts carry no BOS
    stop_words=('<|im_end|>', '<|endoftext|>'))

TEMPLATES = {
    # LLaVA pretraining: '<image>' + caption + eos; the human text is dropped.
    # LLaVA ends with '\n'; we end with the tokenizer's eos so the captioner
    # learns a real stop token (labelled like every other template's end).
    'plain': ChatTemplate(name='plain', keep_user_text=False,
                          single_turn=True),
    # LLaVA-1.5 conv_vicuna_v1: 'SYS USER: q ASSISTANT: a</s>USER: ...'
    'vicuna_v1': ChatTemplate(
        name='vicuna_v1', system='{system} ', default_system=_VICUNA_SYSTEM,
        user='USER: {input}', assistant=' ASSISTANT:', reply_prefix=' ',
        end='</s>', stop_words=('</s>',)),
    'phi3_chat': ChatTemplate(
        name='phi3_chat', system='<|system|>\n{system}<|end|>\n',
        user='<|user|>\n{input}<|end|>\n', assistant='<|assistant|>\n',
        end='<|end|>', sep='\n', stop_words=('<|end|>',)),
    # BOS is <|begin_of_text|>, taken from tokenizer.bos_token_id.
    'llama3_chat': ChatTemplate(
        name='llama3_chat',
        system='<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>',
        user='<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>',
        assistant='<|start_header_id|>assistant<|end_header_id|>\n\n',
        end='<|eot_id|>', stop_words=('<|eot_id|>',)),
    'chatml': _CHATML,
    'qwen_chat': _CHATML,  # XTuner's name; also used for Yi-1.5
}


def get_template(name_or_template: Union[str, ChatTemplate]) -> ChatTemplate:
    """Return a ChatTemplate given one or its name in ``TEMPLATES``."""
    if isinstance(name_or_template, ChatTemplate):
        return name_or_template
    if name_or_template not in TEMPLATES:
        raise KeyError(f'unknown chat template {name_or_template!r}; known: '
                       f'{sorted(TEMPLATES)}')
    return TEMPLATES[name_or_template]


def _parse_turns(conversations, template):
    """Validate roles and alternation; return (system text, [(role, text)])."""
    if not conversations:
        raise ValueError('conversation is empty')
    system, start = template.default_system, 0
    if conversations[0].get('from') == 'system':
        system, start = conversations[0]['value'], 1
    turns = []
    for i, turn in enumerate(conversations[start:], start):
        role = _ROLES.get(turn.get('from'))
        if role is None:
            raise ValueError(f"turn {i}: unknown role {turn.get('from')!r}"
                             ' (a system turn is allowed only at index 0)')
        expected = 'human' if len(turns) % 2 == 0 else 'gpt'
        if role != expected:
            raise ValueError(f'turn {i}: expected a {expected} turn, got '
                             f'{role!r} (turns must alternate human/gpt, '
                             'starting with human)')
        turns.append((role, turn['value']))
    if not turns:
        raise ValueError('conversation has no human turn')
    if template.single_turn and len(turns) > 2:
        raise ValueError(f'template {template.name!r} takes one human/gpt '
                         f'exchange, got {len(turns)} turns')
    return system, turns


def _image_counts(turns, num_image_tokens):
    """Visual-token count for each ``<image>`` in the human turns, in order."""
    n_images = sum(text.count(IMAGE_TOKEN) for role, text in turns
                   if role == 'human')
    if isinstance(num_image_tokens, int):
        counts = [num_image_tokens] * n_images
    else:
        counts = list(num_image_tokens)
    if len(counts) != n_images or any(c < 1 for c in counts):
        raise ValueError(f'the text has {n_images} {IMAGE_TOKEN} but '
                         f'num_image_tokens={num_image_tokens!r}')
    return counts


def _render(system, turns, template, counts, end):
    """Segments ``(piece, labelled)``: piece is text, or an int = image run."""
    segs = []
    if system and template.system:
        segs.append((template.system.format(system=system), False))
    counts = iter(counts)
    for role, text in turns:
        if role == 'gpt':
            segs += [(template.reply_prefix + text + end, True),
                     (template.sep, False)]
            continue
        head, tail = template.user.split('{input}')
        segs.append((head, False))
        parts = text.split(IMAGE_TOKEN)
        for k, part in enumerate(parts):
            if k:  # an <image> sat before this part
                segs.append((next(counts), False))
            if template.keep_user_text:
                segs.append((part, False))
        segs.append((tail + template.assistant, False))
    return segs


def _encode(segs, tokenizer, template):
    """Tokenise segments, joining adjacent text with the same label flag."""
    ids, labels = [], []
    if template.bos and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    text, flag = '', False

    def flush():
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids.extend(piece)
            labels.extend(piece if flag else [IGNORE_INDEX] * len(piece))

    for piece, labelled in segs:
        if isinstance(piece, int):
            flush()
            text = ''
            ids.extend([IMAGE_TOKEN_INDEX] * piece)
            labels.extend([IGNORE_INDEX] * piece)
        elif labelled != flag:
            flush()
            text, flag = piece, labelled
        else:
            text += piece
    flush()
    return ids, labels


def _prepare(conversations, tokenizer, template, num_image_tokens, last):
    """Shared front half of both public functions; returns (ids, labels)."""
    template = get_template(template)
    system, turns = _parse_turns(conversations, template)
    if turns[-1][0] != last:
        raise ValueError(f'turn {len(conversations) - 1}: the conversation '
                         f'must end with a {last} turn here')
    end = template.end if template.end is not None else tokenizer.eos_token
    if end is None:
        raise ValueError(f'template {template.name!r} ends answers with the '
                         "tokenizer's eos_token, but the tokenizer has none")
    # A multi-id end token means template and tokenizer do not match: the
    # model could never emit the stop token it was trained on.
    n_end = len(tokenizer.encode(end, add_special_tokens=False))
    if n_end != 1:
        raise ValueError(f'template {template.name!r} ends answers with '
                         f'{end!r}, which this tokenizer encodes as {n_end} '
                         'ids; it must be a single (special) token')
    counts = _image_counts(turns, num_image_tokens)
    return _encode(_render(system, turns, template, counts, end), tokenizer,
                   template)


def encode_conversation(conversations: Sequence[dict], tokenizer,
                        template: Union[str, ChatTemplate],
                        num_image_tokens: Union[int, Sequence[int]] = 0,
                        max_length: Optional[int] = None) -> dict:
    """Tokenise a training conversation with answer-only labels.

    Args:
        conversations: LLaVA turns ``{'from': 'human'|'gpt', 'value': str}``
            ('user'/'assistant' accepted; an optional leading 'system' turn
            replaces the template's system prompt). Must alternate
            human/gpt from a human turn and end with a gpt turn.
        tokenizer: HF tokenizer (``encode``, ``bos_token_id``, ``eos_token``).
        template: Template name or ChatTemplate.
        num_image_tokens: Visual tokens per ``<image>`` of the human turns:
            an int for all, or one int per occurrence in order. Defaults to 0
            (text only). ``<image>`` in a gpt turn is plain text.
        max_length: Truncate to this many tokens. Defaults to None. Raises
            if that would drop any image token (the image features would no
            longer match); answers cut away entirely are not an error.

    Returns:
        dict: ``input_ids`` and ``labels``, lists of equal length; labels
        are IGNORE_INDEX except on answers and their end-of-turn token.
    """
    ids, labels = _prepare(conversations, tokenizer, template,
                           num_image_tokens, last='gpt')
    ids, labels = truncate_to_max_length(ids, labels, max_length)
    return dict(input_ids=ids, labels=labels)


def truncate_to_max_length(ids, labels, max_length: Optional[int]):
    """(ids, labels) cut to ``max_length`` (lists or 1-D tensors alike); raises if that
    would drop any image token (the image features would no longer match)."""
    if max_length is not None and len(ids) > max_length:
        if IMAGE_TOKEN_INDEX in ids[max_length:]:
            raise ValueError(f'truncating to max_length={max_length} would '
                             'cut image tokens (full length '
                             f'{len(ids)}); raise max_length or drop the '
                             'sample')
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def build_generation_prompt(conversations: Sequence[dict], tokenizer,
                            template: Union[str, ChatTemplate],
                            num_image_tokens: Union[int, Sequence[int]] = 0
                            ) -> list:
    """Token ids for inference, ending with the assistant prefix.

    Uses the same rendering as ``encode_conversation``: for ``[h1, g1, h2]``
    the result equals ``encode_conversation([h1, g1, h2, g2])['input_ids']``
    up to where g2's answer starts.

    Args:
        conversations: As for ``encode_conversation`` but ending with a human
            turn.
        tokenizer: HF tokenizer.
        template: Template name or ChatTemplate.
        num_image_tokens: Visual tokens per ``<image>``. Defaults to 0.

    Returns:
        list[int]: Prompt ids, IMAGE_TOKEN_INDEX at the visual positions.
    """
    ids, _ = _prepare(conversations, tokenizer, template, num_image_tokens,
                      last='human')
    return ids
