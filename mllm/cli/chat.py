"""``mllm chat MODEL --image PATH``: talk to a trained model about an image.

MODEL is an exported folder (``mllm convert pth-to-hf``) or a training config with
``--checkpoint``. With ``--prompt`` it answers once; otherwise it reads questions from stdin
(one per line, multi-turn; an empty line, ``exit`` or end of input stops). Answers are
streamed. The prompt is built by the training code path (``build_generation_prompt``, the
dataset's image processor), so chat sees exactly the token layout the model trained on.
"""
import sys

from mmengine.config import DictAction


def add_arguments(parser):
    parser.add_argument('model', help='exported folder, or a config (then --checkpoint)')
    parser.add_argument('--checkpoint', help='iter_N.pth of the config\'s training')
    parser.add_argument('--image', required=True, help='image file (PNG, JPEG, ...)')
    parser.add_argument('--prompt', help='answer this one question and exit')
    parser.add_argument('--boxes', help='object boxes of the image (MG-LLaVA): a box file '
                        '(`mllm annotate-boxes`) holding the image, or one entry '
                        '{"boxes": [[x1, y1, x2, y2], ...], "labels": [...]}')
    parser.add_argument('--max-boxes', type=int, default=100,
                        help='most object tokens, best scores first (as the dataset)')
    parser.add_argument('--max-new-tokens', type=int, default=256)
    parser.add_argument('--temperature', type=float, default=0.0,
                        help='0 decodes greedily (default); > 0 samples')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='overrides for a config MODEL: key=value ...')
    add_trust_arguments(parser)


def add_trust_arguments(parser):
    """The two opt-ins for code that came with a model (``chat`` and ``eval``)."""
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help="--checkpoint is a third-party file you trust: load it with torch's "
                        'full unpickler if it needs it (that can run code stored in the file)')
    parser.add_argument('--trust-remote-code', action='store_true',
                        help='let the LLM and tokenizer run Python files that came with them '
                        '(their auto_map); off by default, and a model folder cannot turn it on')


def _questions(args):
    if args.prompt is not None:
        yield args.prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print('USER: ', end='', file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ('', 'exit', 'quit'):
            return
        yield line.strip()


def read_box_entry(path: str, image_path: str) -> dict:
    """The boxes of ``image_path`` from a box file, or a file holding a single entry."""
    import os

    from mllm.datasets.boxes import BoxFileError, box_entries, entry_error, read_box_json

    try:
        data = read_box_json(path)  # read once: a box file can be large
        if isinstance(data, dict) and 'boxes' in data:  # a single entry
            if (error := entry_error(data)):
                raise BoxFileError(f'{path}: {error}')
            return data
        entries = box_entries(data, path)
    except BoxFileError as err:
        raise BoxFileError(f'--boxes: {err}') from None
    # keys are relative to an image folder: match the longest key the image path ends with
    image_path = os.path.abspath(image_path).replace(os.sep, '/')
    matches = [k for k in entries if image_path == k or image_path.endswith('/' + k.lstrip('/'))]
    if not matches:
        raise KeyError(f'--boxes: {path} has no entry for {image_path}')
    return entries[max(matches, key=len)]


def run(args) -> int:
    from mllm.datasets.templates import IMAGE_TOKEN
    from mllm.inference.inference import (generate_reply, load_for_inference, load_image,
                                       prompt_inputs)

    if args.max_new_tokens < 1:
        raise ValueError(f'--max-new-tokens must be >= 1, got {args.max_new_tokens}')
    if args.temperature < 0:
        raise ValueError(f'--temperature must be >= 0, got {args.temperature}')
    image = load_image(args.image)  # fail on bad input before loading the model
    box_entry = read_box_entry(args.boxes, args.image) if args.boxes else None
    model, tokenizer, image_processor, template = load_for_inference(
        args.model, args.checkpoint, args.cfg_options, args.trust_remote_code,
        args.trust_checkpoint)
    conversation = []
    for question in _questions(args):
        # the image goes into the first turn, as in LLaVA's training data
        text = question if conversation else f'{IMAGE_TOKEN}\n{question}'
        conversation.append({'from': 'human', 'value': text})
        batch = prompt_inputs(conversation, tokenizer, template, image_processor, image,
                              box_entry=box_entry, max_boxes=args.max_boxes)
        print('ASSISTANT: ', end='', flush=True)
        answer = generate_reply(model, tokenizer, template, batch, args.max_new_tokens,
                                args.temperature, stream=sys.stdout)
        conversation.append({'from': 'gpt', 'value': answer})
    return 0
