"""Loading a trained model and answering with it: the demo's evaluation, chat, eval."""
import sys
from typing import Dict, List, Optional

import torch
from transformers import TextStreamer

from mllm.datasets.collate import llava_collate
from mllm.datasets.llava import expand_image_placeholder, image_inputs
from mllm.datasets.templates import IGNORE_INDEX, build_generation_prompt, stop_token_id
from mllm.inference.loading import load_checkpoint_state, load_model  # noqa: F401 (re-exported)


def last_answer_start(labels: torch.Tensor, where: str = 'the sample') -> int:
    """Where the last answer begins in a training encoding: the tokens before it are the
    generation prompt (the templates guarantee that prefix equals
    ``build_generation_prompt``)."""
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    if not labelled:
        raise ValueError(f'{where}: no answer tokens left (truncated by max_length?)')
    start = labelled[-1]
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


@torch.no_grad()
def answer_questions(model, dataset, indices: Optional[List[int]] = None,
                     batch_size: int = 32, max_new_tokens: int = 8) -> List[str]:
    """Greedy answers to the last human turn of each sample, prompted exactly as in
    training (the same template code path), images processed as in training."""
    tokenizer, template = dataset.tokenizer, dataset.template
    end_id = stop_token_id(tokenizer, template)
    indices = list(range(len(dataset))) if indices is None else indices
    answers = []
    for start in range(0, len(indices), batch_size):
        items = []
        for index in indices[start:start + batch_size]:
            item = dataset[index]  # text and images exactly as training sees them
            prompt = item['input_ids'][:last_answer_start(item['labels'], dataset.describe(index))]
            items.append(dict(input_ids=prompt, pixel_values=item['pixel_values'],
                              boxes=item.get('boxes')))
        batch = llava_collate(items, pad_token_id=tokenizer.pad_token_id, padding_side='left')
        batch = model.data_preprocessor.cast_data(batch)  # to the model's device
        new_tokens = model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                                    pixel_values=batch['pixel_values'], boxes=batch.get('boxes'),
                                    max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                    pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


# ------------------------------------------------------------------ chat: one prompt code path

def load_for_inference(model: str, checkpoint: Optional[str] = None,
                       cfg_options: Optional[dict] = None, trust_remote_code: bool = False,
                       trust_checkpoint: bool = False):
    """``(model, tokenizer, image_processor, template)`` from an exported folder or from a
    training config plus its checkpoint, as the training data used them.

    ``trust_remote_code`` (``--trust-remote-code``) lets the LLM and tokenizer run Python
    files that came with them; an exported folder cannot turn it on, a config still can.
    ``trust_checkpoint`` (``--trust-checkpoint``) lets ``checkpoint``, a third-party file,
    load with torch's full unpickler if it needs it."""
    import os

    from mllm.datasets.templates import get_template
    from mllm.engine.config import load_config
    from mllm.inference.export import MLLM_CONFIG, inference_settings, load_pretrained
    from mllm.datasets.tokenizers import build_tokenizer
    from mllm.registry import TRANSFORMS

    if os.path.isdir(model):
        if checkpoint:
            raise ValueError(f'{model} is an exported folder; --checkpoint is for a config')
        if not os.path.isfile(os.path.join(model, MLLM_CONFIG)):
            raise FileNotFoundError(f'{model} is a folder without {MLLM_CONFIG}: expected an '
                                    'exported model (`mllm convert pth-to-hf`) or a config file')
        return load_pretrained(model, trust_remote_code=trust_remote_code)
    if not checkpoint:
        raise ValueError(f'MODEL {model!r} is not an exported folder, so it must be a config '
                         'and --checkpoint PATH (an iter_N.pth of its training) is needed')
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    if trust_checkpoint:
        from mllm.engine.checkpoint import trust_checkpoint as trust
        trust(checkpoint)
    cfg = load_config(model, cfg_options)
    tokenizer_cfg, template, processor_cfg = inference_settings(cfg)
    if trust_remote_code:  # the flag adds to what the config says, never takes it away
        cfg.model.llm.trust_remote_code = True
        tokenizer_cfg['trust_remote_code'] = True
    return (load_model(cfg, checkpoint), build_tokenizer(tokenizer_cfg),
            TRANSFORMS.build(processor_cfg), get_template(template))


def load_image(path: str):
    """An 8-bit RGB PIL image read as training reads it (``open_rgb``), with clear errors
    for a missing, undecodable or refused file (``ImageError``, a ``ValueError``)."""
    from mllm.datasets.image_processing import open_rgb

    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise FileNotFoundError(f'image not found: {path}') from None


def prompt_inputs(conversations: List[dict], tokenizer, template, image_processor,
                  image=None, box_entry: Optional[dict] = None, max_boxes: int = 100) -> dict:
    """A batch of one for ``model.generate``: the prompt for a conversation ending with a
    human turn, its image (and object boxes, a box-file entry) processed as the dataset
    does, collated as in training."""
    pixel_values, num_tokens, boxes = None, 0, None
    if image is not None:
        pixel_values, num_tokens, boxes = image_inputs(image, image_processor, box_entry,
                                                       max_boxes)
        conversations = expand_image_placeholder(conversations, image_processor, image.size)
    ids = build_generation_prompt(conversations, tokenizer, template, num_image_tokens=num_tokens)
    return llava_collate([dict(input_ids=ids, pixel_values=pixel_values, boxes=boxes)],
                         pad_token_id=tokenizer.pad_token_id, padding_side='left')


class StreamWriter(TextStreamer):
    """transformers' TextStreamer writing to any text stream (stdout by default)."""

    def __init__(self, tokenizer, stream=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream or sys.stdout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.stream.write(text + ('\n' if stream_end else ''))
        self.stream.flush()


@torch.no_grad()
def generate_reply(model, tokenizer, template, batch: dict, max_new_tokens: int = 256,
                   temperature: float = 0.0, stream=None) -> str:
    """Answer of a batch of one from ``prompt_inputs``; greedy unless ``temperature`` > 0.
    With ``stream`` (a text file), the answer is written there token by token."""
    sampling = (dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                if temperature > 0 else dict(do_sample=False))
    if stream is not None:
        sampling['streamer'] = StreamWriter(tokenizer, stream)
    new_tokens = model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                                pixel_values=batch['pixel_values'], boxes=batch.get('boxes'),
                                max_new_tokens=max_new_tokens,
                                eos_token_id=stop_token_id(tokenizer, template),
                                pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip()
