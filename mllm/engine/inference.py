"""Loading a trained model and answering questions with it (the demo's evaluation)."""
import logging
import pickle
from typing import Dict, List, Optional

import torch
from mmengine.logging import print_log

from mllm.datasets.collate import llava_collate
from mllm.datasets.templates import build_generation_prompt


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """The model weights of an ``iter_N.pth`` (tensors only when possible)."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        print_log(f'{path} holds runner state; loading it with weights_only=False',
                  logger='current', level=logging.INFO)
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    return checkpoint.get('state_dict', checkpoint)


def load_model(cfg, checkpoint: Optional[str] = None):
    """Build ``cfg.model`` and load a (possibly trainable-only) checkpoint into it.

    Tensors a trainable-only checkpoint leaves out must be frozen ones, which keep the
    weights the model was built with; anything else missing is an error.
    """
    from mllm.registry import MODELS

    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        result = model.load_state_dict(load_checkpoint_state(checkpoint), strict=False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise ValueError(f'{checkpoint} does not fit this model: missing {missing[:5]}, '
                             f'unexpected {result.unexpected_keys[:5]}')
    return model.eval()


@torch.no_grad()
def answer_questions(model, dataset, indices: Optional[List[int]] = None,
                     batch_size: int = 32, max_new_tokens: int = 8) -> List[str]:
    """Greedy answers to the last human turn of each sample, prompted exactly as in
    training (the same template code path), images processed as in training."""
    tokenizer, template = dataset.tokenizer, dataset.template
    end_id = tokenizer.convert_tokens_to_ids(template.end) if template.end else tokenizer.eos_token_id
    indices = list(range(len(dataset))) if indices is None else indices
    answers = []
    for start in range(0, len(indices), batch_size):
        items = []
        for index in indices[start:start + batch_size]:
            item = dataset[index]  # images exactly as training sees them
            conversations = dataset.samples[index]['conversations']
            num_tokens = int((item['input_ids'] == -200).sum())
            prompt = build_generation_prompt(conversations[:-1], tokenizer, template,
                                             num_image_tokens=num_tokens)
            items.append(dict(input_ids=prompt, pixel_values=item['pixel_values']))
        batch = llava_collate(items, pad_token_id=tokenizer.pad_token_id, padding_side='left')
        new_tokens = model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                                    pixel_values=batch['pixel_values'],
                                    max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                    pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers
