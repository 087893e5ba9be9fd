"""lmms-eval model adapter: run lmms-eval's task zoo on an exported model.

    python -m mllm.evaluation.lmms_eval_adapter --model mllm \
        --model_args pretrained=OUT_DIR --tasks mme --batch_size 1 --output_path results/

``python -m mllm.evaluation.lmms_eval_adapter`` registers the model and then runs lmms-eval's own
command line (any lmms-eval version with ``--model``); with lmms-eval >= 0.6 and mllm
pip-installed, ``python -m lmms_eval --model mllm ...`` works too through the
``lmms_eval.models`` entry point declared in setup.py (``manifest`` below).

Written against lmms-eval 0.7.3 (PyPI; ``lmms_eval.api`` identical in v0.7.2): ``MLLMLmms`` is a
*simple* model (``is_simple = True``), so tasks send ``doc_to_visual`` requests:
``generate_until`` args ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and
``loglikelihood`` args ``(context, doc_to_target, doc_to_visual, doc_id, task, split)``, the doc
being ``self.task_dict[task][split][doc_id]``. Prompts go through the chat code path
(``mllm.inference.inference.prompt_inputs``: training template, image processor, collate), so a
benchmark sees the token layout the model trained on.

lmms-eval is an optional dependency: ``import mllm`` never imports it; this module needs it.
"""
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as err:  # optional dependency
    raise ImportError(f'mllm.evaluation.lmms_eval_adapter needs lmms-eval ({err}); install it with '
                      '`pip install lmms-eval` (optional, not in requirements.txt)') from err

from mllm.datasets.collate import llava_collate
from mllm.datasets.llava import expand_image_placeholder
from mllm.datasets.templates import IGNORE_INDEX, IMAGE_TOKEN, encode_conversation, stop_token_id
from mllm.inference.export import load_pretrained
from mllm.inference.inference import prompt_inputs
from mllm.engine.patches import lmms_eval_keep_loglikelihood_pairs

MODEL_NAME = 'mllm'
CLASS_PATH = 'mllm.evaluation.lmms_eval_adapter.MLLMLmms'
# keys lmms-eval's evaluator adds to model_args (create_from_arg_string's additional_config)
_EVALUATOR_KEYS = ('max_batch_size',)
_DTYPES = {None: torch.float32, 'float32': torch.float32, 'bfloat16': torch.bfloat16,
           'float16': torch.float16}


# ------------------------------------------------------------------ request -> prompt

def llava_question(context: str, num_images: int) -> str:
    """The human turn for ``context``: ``<image>`` placed as lmms-eval's LLaVA does (one per
    image, space-separated, then a newline, before the text) unless the task put it there."""
    if num_images and IMAGE_TOKEN not in context:
        return ' '.join([IMAGE_TOKEN] * num_images) + '\n' + context
    return context


def doc_images(doc_to_visual, doc, where: str) -> list:
    """The doc's images as RGB PIL images; at most one (the models take one image per turn)."""
    from PIL import Image

    visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
    visuals = [v for v in (visuals or []) if v is not None]
    bad = [type(v).__name__ for v in visuals if not isinstance(v, Image.Image)]
    if bad:
        raise ValueError(f'{where}: doc_to_visual gave {bad}; the mllm adapter takes images '
                         '(PIL), not video or audio')
    if len(visuals) > 1:
        raise ValueError(f'{where}: {len(visuals)} images, but mllm models take one image per '
                         'question (choose single-image tasks)')
    from mllm.datasets.image_processing import to_rgb
    return [to_rgb(v, where) for v in visuals]  # 16-bit scaled as in training


def _conversation(context: str, images: list, image_processor) -> Tuple[list, int]:
    """(LLaVA turns with the processor's image layout, visual tokens per ``<image>``)."""
    turns = [{'from': 'human', 'value': llava_question(context, len(images))}]
    if not images:
        return turns, 0
    size = images[0].size
    return (expand_image_placeholder(turns, image_processor, size),
            image_processor.num_visual_tokens(size))


def request_inputs(context: str, images: list, tokenizer, template, image_processor) -> dict:
    """One unbatched item (prompt ids, pixel values) built by ``prompt_inputs``, the code path
    of ``mllm chat``, ready to be collated with others."""
    turns = [{'from': 'human', 'value': llava_question(context, len(images))}]
    batch = prompt_inputs(turns, tokenizer, template, image_processor,
                          images[0] if images else None)
    pixels = batch['pixel_values']  # (1, 3, H, W), or a list of slices
    return dict(input_ids=batch['input_ids'][0],
                pixel_values=None if pixels is None else list(pixels))


def continuation_ids(prompt: list, context: str, continuation: str, images: list, tokenizer,
                     template, image_processor, where: str) -> list:
    """The ids of ``continuation`` after ``prompt`` (``request_inputs``'s ids for ``context``),
    tokenised as training tokenises an answer: the template's reply prefix included, its
    end-of-turn token not."""
    turns, num_tokens = _conversation(context, images, image_processor)
    full = encode_conversation(turns + [{'from': 'gpt', 'value': continuation}], tokenizer,
                               template, num_image_tokens=num_tokens)
    ids, labels = full['input_ids'], full['labels']
    if ids[:len(prompt)] != prompt:  # the templates guarantee it; a new one might not
        raise ValueError(f'{where}: template {template.name!r} renders the prompt differently '
                         'with an answer appended; cannot score continuations')
    answer = [i for i in range(len(prompt), len(ids)) if labels[i] != IGNORE_INDEX][:-1]
    if not answer:
        raise ValueError(f'{where}: empty continuation {continuation!r}')
    return ids[answer[0]:answer[-1] + 1]


def truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the first occurrence of any non-empty stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _until(gen_kwargs: dict) -> List[str]:
    until = gen_kwargs.get('until') or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {until!r}")
    return list(until)


# ------------------------------------------------------------------ the model

@register_model(MODEL_NAME)
class MLLMLmms(lmms):
    """An exported mllm model (``mllm convert pth-to-hf``) as an lmms-eval model.

    Args:
        pretrained: the exported folder (OUT_DIR).
        device: 'cpu', 'cuda', 'cuda:1', ... Defaults to 'cuda' when available, else 'cpu'.
        batch_size: prompts generated together (left-padded). Defaults to 1.
        max_new_tokens: answer length when the task's gen_kwargs set none. Defaults to 256.
        dtype: 'float32', 'bfloat16' or 'float16'. Defaults to float32 (bfloat16 is the usual
            choice on a GPU).
        trust_remote_code: let the folder's LLM and tokenizer run the Python files that came
            with them (``trust_remote_code=True`` in model_args). Defaults to False; the
            folder's own ``mllm_config.json`` cannot turn it on.
    """
    is_simple = True  # doc_to_visual + text-with-<image> requests, not doc_to_messages

    def __init__(self, pretrained: str, device: Optional[str] = None, batch_size=1,
                 max_new_tokens: int = 256, dtype: Optional[str] = None,
                 trust_remote_code=False, **kwargs):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in _EVALUATOR_KEYS)
        if unknown:
            raise TypeError(f'unknown model_args {unknown} for --model {MODEL_NAME}; known: '
                            'pretrained, device, batch_size, max_new_tokens, dtype, '
                            'trust_remote_code')
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lmms-eval also allows 'auto'
            raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
        if dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {sorted(filter(None, _DTYPES))}, '
                             f'got {dtype!r}')
        if int(os.environ.get('WORLD_SIZE', 1)) > 1:
            raise RuntimeError('the mllm adapter runs in one process (WORLD_SIZE > 1 found); '
                               'launch `python -m mllm.evaluation.lmms_eval_adapter` without '
                               'accelerate/torchrun')
        # lmms-eval passes model_args values as parsed by its handle_arg_string: True/False,
        # or the string as written when it leaves it alone
        if str(trust_remote_code).lower() not in ('true', 'false'):
            raise ValueError(f'trust_remote_code must be True or False, got {trust_remote_code!r}')
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        model, self.tokenizer, self.image_processor, self.template = load_pretrained(
            pretrained, trust_remote_code=str(trust_remote_code).lower() == 'true')
        self.model = model.to(self._device, _DTYPES[dtype]).eval()
        lmms_eval_keep_loglikelihood_pairs()  # the evaluator is loaded by now

    @property
    def device(self) -> torch.device:
        return self._device

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _to_device(self, batch: dict) -> dict:
        dtype = next(self.model.parameters()).dtype
        pixels = batch['pixel_values']
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.to(self._device, dtype)
        elif pixels is not None:  # a list of differently shaped images (keep-aspect, slices)
            pixels = [p.to(self._device, dtype) for p in pixels]
        return dict(batch, input_ids=batch['input_ids'].to(self._device),
                    attention_mask=batch['attention_mask'].to(self._device), pixel_values=pixels)

    @torch.no_grad()
    def _generate(self, items: List[dict], gen_kwargs: dict) -> List[str]:
        """Answers for prompts sharing ``gen_kwargs``; the sampling rule of ``generate_reply``
        (greedy unless temperature > 0), stopping at the template's end token."""
        tokenizer = self.tokenizer
        batch = self._to_device(llava_collate(items, pad_token_id=tokenizer.pad_token_id,
                                              padding_side='left'))
        temperature = float(gen_kwargs.get('temperature') or 0)
        sampling = dict(do_sample=False)
        if temperature > 0:
            sampling = dict(do_sample=True, temperature=temperature,
                            top_p=float(gen_kwargs.get('top_p') or 1.0), top_k=0)
        new_tokens = self.model.generate(
            batch['input_ids'], attention_mask=batch['attention_mask'],
            pixel_values=batch['pixel_values'], boxes=None,
            max_new_tokens=int(gen_kwargs.get('max_new_tokens') or self.max_new_tokens),
            eos_token_id=stop_token_id(tokenizer, self.template),
            pad_token_id=tokenizer.pad_token_id, **sampling)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at(text, _until(gen_kwargs)).strip() for text in texts]

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """One answer per request, in request order; consecutive requests with equal
        gen_kwargs are generated ``batch_size`` at a time."""
        answers, chunk, chunk_kwargs = [], [], None
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            where = f'{task}/{split}/doc {doc_id}'
            images = doc_images(doc_to_visual, self._doc(task, split, doc_id), where)
            gen_kwargs = dict(gen_kwargs or {})  # a copy: tasks reuse theirs
            if chunk and (gen_kwargs != chunk_kwargs or len(chunk) == self.batch_size):
                answers += self._generate(chunk, chunk_kwargs)
                chunk = []
            chunk_kwargs = gen_kwargs
            chunk.append(request_inputs(context, images, self.tokenizer, self.template,
                                        self.image_processor))
        if chunk:
            answers += self._generate(chunk, chunk_kwargs)
        return answers

    def _scoring_request(self, request) -> Tuple[str, str, list, str]:
        """(context, continuation, images, where) of a loglikelihood request."""
        if len(request.args) == 2:  # multiple_choice's unconditional (context, choice)
            context, continuation = request.args
            return context, str(continuation), [], 'request'
        context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
        where = f'{task}/{split}/doc {doc_id}'
        doc = self._doc(task, split, doc_id)
        continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
        return context, str(continuation), doc_images(doc_to_visual, doc, where), where

    @torch.no_grad()
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """(loss, is_greedy) per request: loss is the mean negative log-likelihood of the
        continuation tokens, -sum(log p) / n, and is_greedy whether greedy decoding gives
        exactly those tokens.

        NOTE: lmms-eval's docstring asks for the log-probability, but its multiple_choice
        scoring picks ``argmin`` of the first value, because every lmms-eval model (llava,
        llava_hf, qwen_vl, ...) returns the LM loss; a log-probability would pick the least
        likely option. The continuation is scored as the assistant's answer; its leading
        whitespace (lmms-eval's ``target_delimiter`` for plain LMs) is dropped, as the
        template's reply prefix takes that place."""
        results = []
        for request in requests:
            context, continuation, images, where = self._scoring_request(request)
            item = request_inputs(context, images, self.tokenizer, self.template,
                                  self.image_processor)
            prompt = item['input_ids'].tolist()
            answer = continuation_ids(prompt, context, continuation.lstrip(), images,
                                      self.tokenizer, self.template, self.image_processor, where)
            item['input_ids'] = torch.tensor(prompt + answer)
            batch = self._to_device(llava_collate([item], pad_token_id=self.tokenizer.pad_token_id))
            logits = self.model(batch['input_ids'], attention_mask=batch['attention_mask'],
                                pixel_values=batch['pixel_values'], mode='tensor')
            # position t predicts token t + 1
            scores = logits[0, len(prompt) - 1:-1].float().log_softmax(-1)  # (A, V)
            target = torch.tensor(answer, device=scores.device)
            logprob = scores.gather(-1, target[:, None]).sum()
            results.append((-float(logprob) / len(answer),
                            bool((scores.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError(
            f'--model {MODEL_NAME} does not implement generate_until_multi_round (multi-round '
            'tasks); run single-round generate_until or loglikelihood tasks')


# ------------------------------------------------------------------ registration

def manifest():
    """The ``lmms_eval.models`` entry point (lmms-eval >= 0.6, ModelRegistryV2)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model mllm`` resolvable in this process, for any lmms-eval version:
    ModelRegistryV2 (>= 0.6) or the dotted path in AVAILABLE_SIMPLE_MODELS (0.3-0.5)."""
    import lmms_eval.models as models

    registry = getattr(models, 'MODEL_REGISTRY_V2', None)
    if registry is not None:
        registry.register_manifest(manifest(), overwrite=True)
    if hasattr(models, 'AVAILABLE_SIMPLE_MODELS'):
        models.AVAILABLE_SIMPLE_MODELS[MODEL_NAME] = CLASS_PATH
    if hasattr(models, 'AVAILABLE_MODELS') and registry is None:
        models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH


def main(argv: Optional[List[str]] = None) -> int:
    """lmms-eval's command line with ``--model mllm`` registered. Exits 1 when an evaluation
    failed: lmms-eval (0.7.3) logs the error and exits 0."""
    from lmms_eval import evaluator

    register()
    failures, simple_evaluate = [], evaluator.simple_evaluate

    def recording_evaluate(*args, **kwargs):
        try:
            return simple_evaluate(*args, **kwargs)
        except Exception as err:
            failures.append(err)
            raise

    evaluator.simple_evaluate = recording_evaluate  # its CLI calls evaluator.simple_evaluate
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main  # >= 0.7
    except ImportError:
        from lmms_eval.__main__ import cli_evaluate as lmms_eval_main
    try:
        lmms_eval_main()
    finally:
        evaluator.simple_evaluate = simple_evaluate
    if failures:
        print(f'mllm.evaluation.lmms_eval_adapter: error: evaluation failed: {failures[0]!r}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
