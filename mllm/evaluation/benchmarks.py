"""Benchmark files in their public formats -> a list of samples to answer.

Every loader returns dicts with ``id``, ``image`` (a path, or ``image_b64`` for MMBench),
``prompt`` (the text of the human turn after ``<image>\\n``, with LLaVA-1.5's answer-format
instruction), ``answer`` and what the metric needs (category, subtask, ...). Prompts follow
LLaVA-1.5's evaluation scripts (``model_vqa_loader``, ``model_vqa_mmbench``, ``model_vqa_science``).

Formats:
    pope         JSONL ``{"question_id", "image", "text", "label": "yes"|"no", "category"?}``
    mme          the release folder: ``<subtask>/`` with ``questions_answers_YN/<img>.txt`` +
                 ``images/<img>``, or ``<img>.txt`` next to the image; each txt line is
                 ``question<TAB>Yes|No`` (two questions per image)
    textvqa      ``TextVQA_0.5.1_val.json``: ``{"data": [{"question_id", "question", "image_id",
                 "answers": [10 strings]}]}``, images ``<image_folder>/<image_id>.jpg``
    mmbench      TSV: index, question, hint, A..D, answer, category, image (base64); circular
                 copies (index + k * 1e6) are made when the file has none
    scienceqa    ``problems.json`` ``{pid: {question, choices, answer (int), hint, image,
                 split}}``; IMG = problems with an image, images ``<image_folder>/<pid>/image.png``
    gqa          ``testdev_balanced_questions.json`` ``{qid: {imageId, question, answer}}``,
                 images ``<image_folder>/<imageId>.jpg``
    seedbench    ``SEED-Bench.json`` ``{"questions": [{question_id, question, choice_a..d,
                 answer, data_id, data_type, question_type_id}], "question_type": {name: id}}``;
                 image questions only, images ``<image_folder>/<data_id>``
"""
import base64
import csv
import glob
import io
import json
import os
import string
import sys
from typing import Dict, List, Optional

SHORT_ANSWER = 'Answer the question using a single word or phrase.'
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
CIRCULAR_OFFSET = 1_000_000  # MMBench: copy k of question i has index i + k * 1e6


def _image(image_folder: Optional[str], name: str) -> str:
    if not image_folder:
        return name
    from mllm.datasets.llava import resolve_image_path
    resolve_image_path(image_folder, name)  # a name may not escape the folder
    return os.path.join(image_folder, name)


def _read_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'benchmark file not found: {path}')
    with open(path, encoding='utf-8') as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f'{path}: line {err.lineno}: invalid JSON ({err.msg})') from None


def _options_prompt(question: str, options: List[str], hint: Optional[str] = None) -> str:
    lines = [hint] if hint else []
    lines += [question] + [f'{string.ascii_uppercase[i]}. {o}' for i, o in enumerate(options)]
    return '\n'.join(lines + [OPTION_LETTER])


def load_pope(path: str, image_folder: Optional[str] = None) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'benchmark file not found: {path}')
    samples = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                samples.append(dict(id=q['question_id'], image=_image(image_folder, q['image']),
                                    prompt=f"{q['text']}\n{SHORT_ANSWER}", answer=q['label'],
                                    category=q.get('category', 'all')))
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f'{path}: line {lineno}: not a POPE question ({err!r}); '
                                 'expected question_id, image, text, label') from None
    return samples


def load_mme(path: str, image_folder: Optional[str] = None) -> List[dict]:
    """``path`` is the release folder (one subfolder per subtask)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'MME expects the release folder of subtask folders: {path}')
    samples = []
    for subtask in sorted(os.listdir(path)):
        folder = os.path.join(path, subtask)
        qa = os.path.join(folder, 'questions_answers_YN')
        txts = sorted(glob.glob(os.path.join(qa if os.path.isdir(qa) else folder, '*.txt')))
        for txt in txts:
            stem = os.path.splitext(os.path.basename(txt))[0]
            images = glob.glob(os.path.join(folder, 'images' if os.path.isdir(qa) else '',
                                            stem + '.*'))
            images = [p for p in images if not p.endswith('.txt')]
            if not images:
                raise FileNotFoundError(f'{txt}: no image named {stem}.* next to it')
            with open(txt, encoding='utf-8') as f:
                for k, line in enumerate(l for l in f if l.strip()):
                    question, answer = line.rstrip('\n').split('\t')
                    samples.append(dict(id=f'{subtask}/{stem}/{k}', image=images[0],
                                        prompt=question, answer=answer.strip(),
                                        subtask=subtask, image_id=f'{subtask}/{stem}'))
    if not samples:
        raise ValueError(f'{path}: no MME questions found (expected <subtask>/*.txt)')
    return samples


def load_textvqa(path: str, image_folder: Optional[str] = None) -> List[dict]:
    data = _read_json(path)
    data = data['data'] if isinstance(data, dict) else data
    return [dict(id=q['question_id'], image=_image(image_folder, f"{q['image_id']}.jpg"),
                 prompt=f"{q['question']}\n{SHORT_ANSWER}", answer=q['answers'][0],
                 answers=q['answers']) for q in data]


def _mmbench_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'benchmark file not found: {path}')
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f, delimiter='\t'))
    needed = {'index', 'question', 'A', 'B', 'answer', 'image'}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f'{path}: not an MMBench TSV (needs columns {sorted(needed)})')
    return rows


def load_mmbench(path: str, image_folder: Optional[str] = None) -> List[dict]:
    rows = _mmbench_rows(path)
    has_copies = any(int(r['index']) >= CIRCULAR_OFFSET for r in rows)
    samples = []
    for row in rows:
        options = [row[c] for c in 'ABCD' if row.get(c) not in (None, '', 'nan')]
        answer = string.ascii_uppercase.index(row['answer'])
        shifts = [0] if has_copies else range(len(options))  # circular copies
        for k in shifts:
            order = options[k:] + options[:k]
            hint = row.get('hint') if row.get('hint') not in (None, '', 'nan') else None
            samples.append(dict(id=int(row['index']) + k * CIRCULAR_OFFSET,
                                group=int(row['index']) % CIRCULAR_OFFSET,
                                image_b64=row['image'],
                                prompt=_options_prompt(row['question'], order, hint),
                                answer=string.ascii_uppercase[(answer - k) % len(options)],
                                num_options=len(options), category=row.get('category', 'all')))
    return samples


def load_scienceqa(path: str, image_folder: Optional[str] = None,
                   split: str = 'test') -> List[dict]:
    problems = _read_json(path)
    samples = []
    for pid, p in problems.items():
        if p.get('split', split) != split or not p.get('image'):
            continue  # ScienceQA-IMG: only questions with an image
        samples.append(dict(id=pid, image=_image(image_folder, os.path.join(pid, p['image'])),
                            prompt=_options_prompt(p['question'], p['choices'],
                                                   f"Context: {p['hint']}" if p.get('hint') else None),
                            answer=string.ascii_uppercase[p['answer']],
                            num_options=len(p['choices']), category=p.get('subject', 'all')))
    return samples


def load_gqa(path: str, image_folder: Optional[str] = None) -> List[dict]:
    questions = _read_json(path)
    return [dict(id=qid, image=_image(image_folder, f"{q['imageId']}.jpg"),
                 prompt=f"{q['question']}\n{SHORT_ANSWER}", answer=q['answer'])
            for qid, q in questions.items()]


def load_seedbench(path: str, image_folder: Optional[str] = None) -> List[dict]:
    data = _read_json(path)
    type_names = {v: k for k, v in data.get('question_type', {}).items()}
    samples = []
    for q in data['questions']:
        if q.get('data_type', 'image') != 'image':
            continue  # video questions need frames, not one image
        options = [q[f'choice_{c}'] for c in 'abcd']
        samples.append(dict(id=q['question_id'], image=_image(image_folder, q['data_id']),
                            prompt=_options_prompt(q['question'], options),
                            answer=q['answer'], num_options=4,
                            category=type_names.get(q.get('question_type_id'),
                                                    str(q.get('question_type_id', 'all')))))
    return samples


LOADERS = dict(pope=load_pope, mme=load_mme, textvqa=load_textvqa, mmbench=load_mmbench,
               scienceqa=load_scienceqa, gqa=load_gqa, seedbench=load_seedbench)


def load_benchmark(name: str, path: str, image_folder: Optional[str] = None) -> List[dict]:
    if name not in LOADERS:
        raise KeyError(f'unknown benchmark {name!r}; known: {sorted(LOADERS)}')
    return LOADERS[name](path, image_folder)


def open_image(sample: Dict):
    """The sample's image as RGB PIL (a file, or MMBench's base64 field)."""
    if 'image_b64' in sample:
        from mllm.datasets.image_processing import open_rgb
        return open_rgb(io.BytesIO(base64.b64decode(sample['image_b64'])),
                        name=f"of question {sample['id']} (image_b64)")
    from mllm.inference.inference import load_image
    return load_image(sample['image'])
