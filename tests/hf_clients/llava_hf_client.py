"""A transformers user's LLaVA route, run in a process that cannot import mllm.

    python llava_hf_client.py JOB.json   ->   JSON on stdout

JOB: ``{"folder": ..., "max_new_tokens": N, "prompts": [{"image": PATH, "messages": [...]}]}``.
For each prompt: ``AutoProcessor.apply_chat_template`` -> ``processor(images=, text=)`` ->
``model.generate(**inputs)`` with nothing else set, exactly as the model card of an HF LLaVA
says. Every Python warning and transformers log record of level WARNING or above is returned
in ``warnings``.
"""
import json
import logging
import sys
import warnings


class _NoMllm:
    """Import hook: any ``import mllm`` fails, so nothing here can lean on mllm."""

    def find_spec(self, name, path=None, target=None):
        if name == 'mllm' or name.startswith('mllm.'):
            raise ImportError(f'{name}: this client runs without mllm')
        return None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f'{record.name}: {record.getMessage()}')


def main(job_path):
    sys.meta_path.insert(0, _NoMllm())
    records = _Records()
    logging.getLogger('transformers').addHandler(records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        with open(job_path) as f:
            job = json.load(f)
        processor = AutoProcessor.from_pretrained(job['folder'])
        tokenizer = AutoTokenizer.from_pretrained(job['folder'])
        model = AutoModelForImageTextToText.from_pretrained(job['folder']).eval()
        results = []
        for prompt in job['prompts']:
            text = processor.apply_chat_template(prompt['messages'], add_generation_prompt=True)
            image = Image.open(prompt['image']).convert('RGB')
            inputs = processor(images=image, text=text, return_tensors='pt')
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=job['max_new_tokens'])
            new = out[0, inputs['input_ids'].shape[1]:]
            string_messages = [dict(m, content=_as_string(m['content']))
                               for m in prompt['messages']]
            results.append(dict(
                text=text, input_names=sorted(inputs.keys()),
                ids=inputs['input_ids'][0].tolist(),
                image_tokens=int((inputs['input_ids'] == model.config.image_token_index).sum()),
                answer=processor.decode(new, skip_special_tokens=True).strip(),
                tokenizer_text=tokenizer.apply_chat_template(
                    string_messages, tokenize=False, add_generation_prompt=True),
                tokenizer_input_names=sorted(tokenizer(text).keys())))
    print(json.dumps(dict(results=results, mllm_imported='mllm' in sys.modules,
                          warnings=records.messages + [str(w.message) for w in caught])))


def _as_string(content):
    """lmms-eval's form of a user turn: one string with ``<image>`` where the image goes."""
    if isinstance(content, str):
        return content
    return '\n'.join('<image>' if item['type'] == 'image' else item['text'] for item in content)


if __name__ == '__main__':
    main(sys.argv[1])
