"""Chat templates and the one tokenisation path shared by training and chat.

A conversation in LLaVA's JSON format (``[{'from': 'human', 'value': ...},
{'from': 'gpt', 'value': ...}, ...]``) is rendered and tokenised the way the
system that defined the template did it, so ids and labels are those its own
training code produced (tests/test_token_exact.py runs that code side by side):

- ``encoding='llava'`` (``vicuna_v1``, ``plain``): LLaVA-1.5's
  ``preprocess_multimodal`` + ``preprocess_v1`` / ``preprocess_plain``. The
  whole prompt string is tokenised, split only at images
  (``tokenizer_image_token``: every chunk with the tokenizer's own prefix
  space, BOS kept on the first), and the labels follow LLaVA's length rule
  (per round, the instruction's length is masked), including its correction
  for non-legacy Llama tokenizers.
- ``encoding='xtuner'`` (``vicuna``): XTuner's ``template_map_fn`` +
  ``encode_fn`` (MG-LLaVA): per turn BOS + instruction, answer, EOS, SEP, each
  piece tokenised on its own.
- ``encoding='pieces'`` (``phi3_chat``, ``llama3_chat``, ``chatml``): segments
  of the same label flag are joined and tokenised with
  ``tokenizer.encode(piece, add_special_tokens=False)``, breaking only at
  image runs and label boundaries. These are XTuner's templates (LLaVA-Llama-3,
  MG-LLaVA); for ``llama3_chat`` with the real Llama-3 tokenizer this equals
  XTuner's ``encode_fn`` (tested), Phi-3 and Yi tokenizers are not available
  here to check.

Every template moves the image placeholder(s) to the front of their turn,
followed by ``'\n'``, as LLaVA's ``preprocess_multimodal`` and XTuner's
``llava_map_fn`` do. ``encode_conversation`` renders the whole conversation;
``build_generation_prompt`` renders it up to the assistant prefix of the last
turn, which is the official inference prompt (LLaVA's ``conv.get_prompt()`` +
``tokenizer_image_token``; XTuner's ``INSTRUCTION``).
"""
import warnings
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
            model learns to stop; None means ``tokenizer.eos_token`` (with
            encoding 'xtuner': the EOS id, after which the next turn starts
            with BOS again, as XTuner's ``encode_fn`` does).
        sep: Unlabelled text after ``end`` (ChatML's and Phi-3's newline).
        bos: Prepend ``tokenizer.bos_token_id`` (skipped if it has none).
        keep_user_text: False drops the user text except its ``<image>``
            placeholders (LLaVA's 'plain' pretraining format).
        single_turn: Only one human/gpt exchange is allowed ('plain').
        stop_words: Strings that end generation.
        encoding: How the rendered text becomes ids and labels: 'pieces',
            'llava' or 'xtuner' (see the module docstring). Defaults to
            'pieces'.
        image_first: Move a turn's image placeholder(s) to its front,
            followed by '\n' (LLaVA's ``preprocess_multimodal``, XTuner's
            ``llava_map_fn``). Defaults to True.
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
    encoding: str = 'pieces'
    image_first: bool = True

    def __post_init__(self):
        if self.user.count('{input}') != 1:
            raise ValueError(f'template {self.name!r}: `user` must contain '
                             f"'{{input}}' exactly once, got {self.user!r}")
        if self.encoding not in ('pieces', 'llava', 'xtuner'):
            raise ValueError(f'template {self.name!r}: encoding must be '
                             f"'pieces', 'llava' or 'xtuner', got {self.encoding!r}")


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
    # LLaVA pretraining (conv_llava_plain): '<image>' + caption + '\n'; the human
    # text is dropped and the caption ends with '\n' (labelled), as in LLaVA.
    'plain': ChatTemplate(name='plain', keep_user_text=False, end='\n',
                          single_turn=True, encoding='llava'),
    # LLaVA-1.5 conv_vicuna_v1: 'SYS USER: q ASSISTANT: a</s>USER: ...'
    'vicuna_v1': ChatTemplate(
        name='vicuna_v1', system='{system} ', default_system=_VICUNA_SYSTEM,
        user='USER: {input}', assistant=' ASSISTANT:', reply_prefix=' ',
        end='</s>', stop_words=('</s>',), encoding='llava'),
    # XTuner's PROMPT_TEMPLATE.vicuna (MG-LLaVA, both stages): no system prompt
    # unless the data has one; per turn '<s>USER: q ASSISTANT:' a '</s>' '\n'.
    'vicuna': ChatTemplate(
        name='vicuna', system=_VICUNA_SYSTEM + ' {system}\n ',
        user='USER: {input}', assistant=' ASSISTANT:', sep='\n',
        stop_words=('</s>',), encoding='xtuner'),
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


def _image_first(text):
    """LLaVA's ``preprocess_multimodal`` / XTuner's ``llava_map_fn``: the image
    placeholder moved to the front of the turn, then '\n', text stripped. A
    processor's layout of several placeholders (UHD slices: only separators
    between them) moves as a block; several images with words between them
    (which neither LLaVA nor XTuner trains on) stay where they are."""
    first = text.find(IMAGE_TOKEN)
    if first < 0:
        return text
    last = text.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
    if any(c.isalnum() for c in text[first:last].replace(IMAGE_TOKEN, '')):
        return text
    rest = (text[:first] + text[last:]).strip()
    return (text[first:last] + '\n' + rest).strip()


def _expand_images(ids, labels, counts):
    """One IMAGE_TOKEN_INDEX per image -> a run of ``counts[k]`` for image k."""
    out_ids, out_labels, counts = [], [], iter(counts)
    for i, label in zip(ids, labels):
        n = next(counts) if i == IMAGE_TOKEN_INDEX else 1
        out_ids += [i] * n
        out_labels += [label] * n
    return out_ids, out_labels


def _render_text(system, turns, template, end):
    """The conversation as one string, one IMAGE_TOKEN per image (LLaVA's
    ``conv.get_prompt()``; for 'plain' the human text is the images only)."""
    text = template.system.format(system=system) if system and template.system else ''
    for role, value in turns:
        if role == 'gpt':
            text += template.reply_prefix + value + end + template.sep
        elif template.keep_user_text:
            text += template.user.format(input=value) + template.assistant
        else:
            images = IMAGE_TOKEN * value.count(IMAGE_TOKEN)
            text += template.user.format(input=images) + template.assistant
    return text


def _tokenize_image_texts(texts, tokenizer):
    """LLaVA's ``tokenizer_image_token`` for each text: each chunk between
    images tokenised with the tokenizer's special tokens, the first chunk's
    BOS kept, the first id of every chunk dropped when the tokenizer adds a
    BOS. All chunks go to the tokenizer in one batch."""
    split = [text.split(IMAGE_TOKEN) for text in texts]
    encoded = iter(tokenizer([c for chunks in split for c in chunks]).input_ids)
    out = []
    for chunks in split:
        chunks = [next(encoded) for _ in chunks]
        offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
        ids = chunks[0][:offset]
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        out.append(ids)
    return out


def _encode_llava(system, turns, template, end, tokenizer, generation):
    """(ids, labels) with one image id per image, as LLaVA's ``preprocess_v1``
    (``sep2`` = ``end``) or ``preprocess_plain`` (``keep_user_text=False``)."""
    for role, value in turns:
        if role == 'gpt' and IMAGE_TOKEN in value:
            raise ValueError(f'an answer contains {IMAGE_TOKEN!r}; LLaVA\'s encoding '
                             'would take it for an image')
    text = _render_text(system, turns, template, end)
    if generation:
        ids, = _tokenize_image_texts([text], tokenizer)
        return ids, [IGNORE_INDEX] * len(ids)
    if not template.keep_user_text:  # preprocess_plain: mask the image prefix
        prompt = _render_text(system, turns[:1], template, end)
        ids, prompt_ids = _tokenize_image_texts([text, prompt], tokenizer)
        n = len(prompt_ids)
        return ids, [IGNORE_INDEX] * n + ids[n:]
    # preprocess_v1: per round (split at sep2), mask the instruction's length
    # (minus BOS) and advance by the round's length (its BOS stands for the
    # dropped sep2). LLaVA masks len(tokens of 'USER: q ASSISTANT: ') - 2,
    # assuming the trailing space is one token (Llama's '▁'); we mask
    # len(tokens of 'USER: q ASSISTANT:') - 1: the same for Llama/Vicuna (tested
    # against LLaVA's code), and no label on ':' for tokenizers that drop the
    # space (word-level ones).
    sep = template.assistant + template.reply_prefix
    rounds = []
    for rou in text.split(end):
        parts = rou.split(sep)
        if rou == '' or len(parts) != 2:
            break
        rounds += [rou, (parts[0] + sep).rstrip(' ')]
    ids, *lengths = _tokenize_image_texts([text] + rounds, tokenizer)
    lengths = [len(x) for x in lengths]
    labels = list(ids)
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i in range(len(rounds) // 2):
        round_len, instruction_len = lengths[2 * i], lengths[2 * i + 1] - 1
        # LLaVA's correction: a non-legacy Llama tokenizer adds no prefix space
        # after '</s>', so later rounds are one token shorter in context.
        if i and getattr(tokenizer, 'legacy', True) is False:
            round_len -= 1
            instruction_len -= 1
        for j in range(cur, min(cur + instruction_len, len(labels))):
            labels[j] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * max(len(labels) - cur, 0)
    if cur != len(ids):
        # LLaVA then trains on no token of the sample, with this warning.
        warnings.warn(f'tokenization mismatch: {cur} vs. {len(ids)} (template '
                      f'{template.name!r}); the sample has no labelled token')
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


def _encode_xtuner(system, turns, template, counts, tokenizer):
    """(ids, labels) as XTuner's ``template_map_fn`` + ``encode_fn``: per turn
    [BOS] + instruction (split at images), answer (+ ``end`` text, or EOS id
    when ``end`` is None, after which the next turn starts with BOS again) and
    ``sep``, each tokenised on its own."""
    bos = [] if tokenizer.bos_token_id is None or not template.bos else [tokenizer.bos_token_id]
    ids, labels, counts, needs_bos = [], [], iter(counts), True

    def add(piece, labelled):
        ids.extend(piece)
        labels.extend(piece if labelled else [IGNORE_INDEX] * len(piece))

    for k in range(0, len(turns), 2):
        instruction = template.user.format(input=turns[k][1]) + template.assistant
        if k == 0 and system and template.system:
            instruction = template.system.format(system=system) + instruction
        if needs_bos:
            add(bos, False)
        for j, chunk in enumerate(instruction.split(IMAGE_TOKEN)):
            if j:
                add([IMAGE_TOKEN_INDEX] * next(counts), False)
            add(tokenizer.encode(chunk, add_special_tokens=False), False)
        if k + 1 == len(turns):  # generation prompt
            break
        answer = turns[k + 1][1] + (template.end or '')
        add(tokenizer.encode(answer, add_special_tokens=False), True)
        needs_bos = template.end is None
        if needs_bos:
            add([tokenizer.eos_token_id], True)
        if template.sep:
            add(tokenizer.encode(template.sep, add_special_tokens=False), False)
    return ids, labels


def _with_image_layouts(prepare):
    """An image count may carry its own layout (``token_ids(tokenizer)``; LLaVA-UHD's
    ``SliceLayout``: slices with the release's separator ids between them). Every encoding
    gives it ``int(count)`` sentinel slots; those slots are then overwritten with its ids,
    so the separators are embedded as ids, never tokenised in context."""
    def wrapped(conversations, tokenizer, template, num_image_tokens, last):
        ids, labels = prepare(conversations, tokenizer, template, num_image_tokens, last)
        counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if not any(hasattr(c, 'token_ids') for c in counts):
            return ids, labels
        slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        if isinstance(num_image_tokens, int):  # the same count for every image
            counts = counts * (len(slots) // num_image_tokens)
        ids, start = list(ids), 0
        for count in counts:
            if hasattr(count, 'token_ids'):
                for slot, token in zip(slots[start:start + count], count.token_ids(tokenizer)):
                    ids[slot] = token
            start += count
        return ids, labels
    return wrapped


@_with_image_layouts
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
    # A multi-id stop token means template and tokenizer do not match: the
    # model could never emit the stop token it was trained on. ('plain' ends
    # captions with '\n', which is no stop token.)
    if template.end is None or end in template.stop_words:
        n_end = len(tokenizer.encode(end, add_special_tokens=False))
        if n_end != 1:
            raise ValueError(f'template {template.name!r} ends answers with '
                             f'{end!r}, which this tokenizer encodes as {n_end} '
                             'ids; it must be a single (special) token')
    counts = _image_counts(turns, num_image_tokens)
    if template.image_first:
        turns = [(role, _image_first(text) if role == 'human' else text)
                 for role, text in turns]
    if template.encoding == 'llava':
        ids, labels = _encode_llava(system, turns, template, end, tokenizer,
                                    generation=last == 'human')
        return _expand_images(ids, labels, counts)
    if template.encoding == 'xtuner':
        return _encode_xtuner(system, turns, template, counts, tokenizer)
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


def stop_token_id(tokenizer, template: Union[str, ChatTemplate]) -> int:
    """The id that ends a generated answer: the template's end-of-turn token when it is one
    of its stop words, else eos ('plain' ends captions with '\\n', which is no token)."""
    template = get_template(template)
    if template.end is not None and template.end in template.stop_words:
        return tokenizer.convert_tokens_to_ids(template.end)
    return tokenizer.eos_token_id
