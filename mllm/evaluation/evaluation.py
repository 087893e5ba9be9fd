"""Benchmark metrics over answered samples (``mllm.evaluation.benchmarks`` + a ``prediction``).

Each ``*_metrics(records)`` takes the samples with a ``prediction`` string, sets
``record['correct']`` (written to predictions.jsonl) and returns a flat summary dict in
percent. Answer parsing follows the public scorers: LLaVA's ``eval_pope.py``, MME's
``calculation.py``, the VQA / EvalAI answer processor, MMBench's circular evaluation.
"""
import itertools
import re
import string
from collections import defaultdict
from typing import Callable, Dict, List

from tqdm import tqdm

MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation',
                 'code_reasoning')


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


# ------------------------------------------------------------------ yes / no

def pope_answer(text: str) -> str:
    """LLaVA's eval_pope.py: 'no' if the first sentence has the word No / no / not."""
    text = text.split('.')[0] if '.' in text else text
    words = text.replace(',', '').split(' ')
    return 'no' if any(w in words for w in ('No', 'not', 'no')) else 'yes'


def _yes_no_scores(records: List[dict]) -> dict:
    tp = sum(r['pred'] == 'yes' and r['answer'] == 'yes' for r in records)
    fp = sum(r['pred'] == 'yes' and r['answer'] == 'no' for r in records)
    tn = sum(r['pred'] == 'no' and r['answer'] == 'no' for r in records)
    fn = sum(r['pred'] == 'no' and r['answer'] == 'yes' for r in records)
    precision, recall = _pct(tp, tp + fp), _pct(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=_pct(tp + tn, len(records)), precision=precision, recall=recall,
                f1=f1, yes_ratio=_pct(tp + fp, len(records)))


def pope_metrics(records: List[dict]) -> dict:
    for r in records:
        r['answer'] = r['answer'].strip().lower()
        r['pred'] = pope_answer(r['prediction'])
        r['correct'] = r['pred'] == r['answer']
    summary = _yes_no_scores(records)
    by_category = defaultdict(list)
    for r in records:
        by_category[r['category']].append(r)
    if len(by_category) > 1:
        for category, rs in sorted(by_category.items()):
            summary.update({f'{category}/{k}': v for k, v in _yes_no_scores(rs).items()})
    return summary


def mme_answer(text: str) -> str:
    """MME's calculation.py: 'yes' / 'no' if the answer is or starts with it, else 'other'."""
    text = text.strip().lower()
    if text in ('yes', 'no'):
        return text
    head = text[:4]
    return 'yes' if 'yes' in head else 'no' if 'no' in head else 'other'


def mme_metrics(records: List[dict]) -> dict:
    """Per subtask: acc (questions) + acc+ (images with both questions right), each in
    percent, score = acc + acc+ (max 200); perception sums 10 subtasks (max 2000),
    cognition 4 (max 800)."""
    by_subtask = defaultdict(lambda: defaultdict(list))
    for r in records:
        r['correct'] = mme_answer(r['prediction']) == r['answer'].strip().lower()
        by_subtask[r['subtask']][r['image_id']].append(r['correct'])
    summary, totals = {}, dict(perception=0.0, cognition=0.0)
    for subtask, images in sorted(by_subtask.items()):
        answers = [c for cs in images.values() for c in cs]
        acc = _pct(sum(answers), len(answers))
        acc_plus = _pct(sum(all(cs) for cs in images.values()), len(images))
        summary.update({f'{subtask}/acc': acc, f'{subtask}/acc_plus': acc_plus,
                        f'{subtask}/score': acc + acc_plus})
        totals['cognition' if subtask in MME_COGNITION else 'perception'] += acc + acc_plus
    return dict(totals, **summary)


# ------------------------------------------------------------------ VQA accuracy

_CONTRACTIONS = {  # the VQA processor's table, apostrophe-less forms of common ones
    'arent': "aren't", 'cant': "can't", 'couldnt': "couldn't", 'didnt': "didn't",
    'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't", 'hasnt': "hasn't",
    'havent': "haven't", 'hes': "he's", 'im': "i'm", 'isnt': "isn't", 'itd': "it'd",
    'ive': "i've", 'shouldnt': "shouldn't", 'thats': "that's", 'theres': "there's",
    'theyre': "they're", 'wasnt': "wasn't", 'werent': "weren't", 'whats': "what's",
    'wont': "won't", 'wouldnt': "wouldn't", 'youre': "you're", 'youve': "you've"}
_NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
            'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = ('a', 'an', 'the')
_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
          '@', '`', ',', '?', '!']


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer processing: punctuation, periods not inside numbers,
    number words to digits, articles dropped, contractions restored; lower case."""
    text = text.replace('\n', ' ').replace('\t', ' ').strip().lower()
    for p in _PUNCT:  # removed next to spaces / where it glues words, else turned into space
        if (p + ' ' in text or ' ' + p in text) or re.search(r'(?<=\d),(?=\d)', text):
            text = text.replace(p, '')
        else:
            text = text.replace(p, ' ')
    text = re.sub(r'(?!<=\d)(\.)(?!\d)', '', text)  # periods, except decimal points
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return ' '.join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: List[str]) -> float:
    """min(#humans that said it / 3, 1), averaged over the 10 choose-9 annotator subsets."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = [min(sum(g == pred for g in subset) / 3, 1.0)
              for subset in itertools.combinations(gts, len(gts) - 1)]
    return sum(scores) / len(scores)


def textvqa_metrics(records: List[dict]) -> dict:
    for r in records:
        r['score'] = vqa_accuracy(r['prediction'], r['answers'])
        r['correct'] = r['score'] > 0
    return dict(accuracy=100.0 * sum(r['score'] for r in records) / len(records))


def gqa_metrics(records: List[dict]) -> dict:
    """Exact match after the VQA normalisation (GQA answers are one or two words)."""
    for r in records:
        r['correct'] = normalize_vqa_answer(r['prediction']) == normalize_vqa_answer(r['answer'])
    return dict(accuracy=_pct(sum(r['correct'] for r in records), len(records)))


# ------------------------------------------------------------------ multiple choice

def option_letter(text: str, num_options: int) -> str:
    """The chosen option: a bare letter, or 'A.' / '(A)' / 'A)' at the start; else ''."""
    letters = string.ascii_uppercase[:num_options]
    text = text.strip()
    match = re.match(rf'^\(?([{letters}])(?:[.):\s]|$)', text)
    return match.group(1) if match else ''


def _per_category(records: List[dict], key: str = 'correct') -> dict:
    by_category = defaultdict(list)
    for r in records:
        by_category[r.get('category', 'all')].append(r[key])
    if len(by_category) < 2:
        return {}
    return {f'{c}/accuracy': _pct(sum(v), len(v)) for c, v in sorted(by_category.items())}


def multiple_choice_metrics(records: List[dict]) -> dict:
    for r in records:
        r['pred'] = option_letter(r['prediction'], r['num_options'])
        r['correct'] = r['pred'] == r['answer']
    return dict(accuracy=_pct(sum(r['correct'] for r in records), len(records)),
                **_per_category(records))


def mmbench_metrics(records: List[dict]) -> dict:
    """Circular evaluation: a question is right only if every circular shift of its
    options is answered right; also the plain per-row accuracy."""
    multiple_choice_metrics(records)
    groups = defaultdict(list)
    for r in records:
        groups[r['group']].append(r)
    questions = [dict(category=rs[0].get('category', 'all'), correct=all(x['correct'] for x in rs))
                 for rs in groups.values()]
    return dict(circular_accuracy=_pct(sum(q['correct'] for q in questions), len(questions)),
                row_accuracy=_pct(sum(r['correct'] for r in records), len(records)),
                **_per_category(questions))


METRICS = dict(pope=pope_metrics, mme=mme_metrics, textvqa=textvqa_metrics,
               mmbench=mmbench_metrics, scienceqa=multiple_choice_metrics,
               gqa=gqa_metrics, seedbench=multiple_choice_metrics)


def evaluate(name: str, samples: List[dict], predict: Callable[[dict], str],
             progress: bool = True) -> Dict:
    """Answer every sample with ``predict(sample) -> str`` and score them.

    Returns:
        dict(summary=..., records=[...]) with one record per sample (its fields without
        the image, the prediction and whether it is correct).
    """
    records = []
    for sample in tqdm(samples, desc=name, disable=not progress, dynamic_ncols=True):
        record = {k: v for k, v in sample.items() if k != 'image_b64'}
        record['prediction'] = predict(sample)
        records.append(record)
    summary = METRICS[name](records)
    return dict(summary=summary, records=records)
