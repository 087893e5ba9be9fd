"""A transformers user loading a ``--format remote_code`` export, in a process that cannot
import mllm:

    python remote_code_client.py JOB.json OUT.pt

JOB: ``{"folder": ..., "image": PATH, "messages": [...], "max_new_tokens": N}``, optionally
``"boxes": [[x1, y1, x2, y2], ...]`` (MG-LLaVA object boxes, pixels of the image).
``AutoModelForCausalLM`` / ``AutoProcessor`` with ``trust_remote_code=True``, the chat
template, ``processor(images=, text=[, boxes=])``, one forward (logits and the processor's
image inputs saved to OUT.pt) and ``generate``; JSON on stdout.
"""
import json
import sys

from llava_hf_client import _NoMllm  # same folder: the same import block


def main(job_path, logits_path):
    sys.meta_path.insert(0, _NoMllm())
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    with open(job_path) as f:
        job = json.load(f)
    processor = AutoProcessor.from_pretrained(job['folder'], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(job['folder'], trust_remote_code=True).eval()
    text = processor.apply_chat_template(job['messages'], add_generation_prompt=True)
    boxes = {'boxes': job['boxes']} if job.get('boxes') is not None else {}
    inputs = processor(images=Image.open(job['image']).convert('RGB'), text=text,
                       return_tensors='pt', **boxes)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=job['max_new_tokens'])
    torch.save(dict(logits=logits, pixel_values=inputs['pixel_values'],
                    image_sizes=inputs.get('image_sizes'), bboxes=inputs.get('bboxes')),
               logits_path)
    new = out[0, inputs['input_ids'].shape[1]:]
    print(json.dumps(dict(
        ids=inputs['input_ids'][0].tolist(), model_class=type(model).__name__,
        new_ids=new.tolist(),
        answer=processor.decode(new, skip_special_tokens=True).strip(),
        mllm_imported='mllm' in sys.modules,
        model_file=sys.modules[type(model).__module__].__file__)))


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
