"""Benchmarks: each public file format is read, each metric's arithmetic is checked exactly
with a stub predictor of known answers, and `mllm eval` runs end to end with a tiny model."""
import base64
import io
import json

import pytest
import torch
from PIL import Image

from mllm.cli import main
from mllm.evaluation.benchmarks import load_benchmark
from mllm.evaluation.evaluation import evaluate, normalize_vqa_answer, vqa_accuracy

TINY = 'configs/tiny/tiny_llava_synthetic.py'


def png(path, colour=(255, 0, 0)):
    Image.new('RGB', (40, 30), colour).save(path)
    return path


def stub(predictions):
    """A predictor that answers from a table keyed by sample id."""
    return lambda sample: predictions[sample['id']]


def test_pope(tmp_path):
    labels = ['yes', 'yes', 'yes', 'no', 'no', 'no']
    lines = [dict(question_id=i, image=f'{i}.png', text=f'Is there a dog in image {i}?',
                  label=label, category='random' if i < 3 else 'adversarial')
             for i, label in enumerate(labels)]
    path = tmp_path / 'pope.jsonl'
    path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    samples = load_benchmark('pope', str(path), 'imgs')
    assert samples[0]['image'] == 'imgs/0.png'
    assert samples[0]['prompt'].endswith('\nAnswer the question using a single word or phrase.')
    # parsed as yes, no, yes, yes, no, no: TP 2, FN 1, FP 1, TN 2
    answers = ['Yes', 'No, there is not.', 'yes.', 'Yes it is', 'no', 'There is no dog.']
    summary = evaluate('pope', samples, stub(dict(enumerate(answers))), progress=False)['summary']
    assert summary['accuracy'] == pytest.approx(400 / 6)
    assert summary['precision'] == pytest.approx(200 / 3)
    assert summary['recall'] == pytest.approx(200 / 3)
    assert summary['f1'] == pytest.approx(200 / 3)
    assert summary['yes_ratio'] == pytest.approx(50.0)
    assert summary['random/accuracy'] == pytest.approx(200 / 3)  # yes, no, yes vs yes x3
    assert summary['adversarial/yes_ratio'] == pytest.approx(100 / 3)


def test_mme(tmp_path):
    root = tmp_path / 'MME'
    # layout 1: images/ + questions_answers_YN/ (perception subtask)
    (root / 'existence' / 'images').mkdir(parents=True)
    (root / 'existence' / 'questions_answers_YN').mkdir()
    for stem in ('a', 'b'):
        png(root / 'existence' / 'images' / f'{stem}.png')
        (root / 'existence' / 'questions_answers_YN' / f'{stem}.txt').write_text(
            f'Is there a cat in {stem}? Please answer yes or no.\tYes\n'
            f'Is there a dog in {stem}? Please answer yes or no.\tNo\n')
    # layout 2: txt next to the image (cognition subtask)
    (root / 'code_reasoning').mkdir()
    png(root / 'code_reasoning' / 'c.png')
    (root / 'code_reasoning' / 'c.txt').write_text('Prints 3?\tYes\nPrints 4?\tNo\n')
    samples = load_benchmark('mme', str(root))
    assert len(samples) == 6
    predictions = {'existence/a/0': 'Yes', 'existence/a/1': 'No, it is not.',  # a: both right
                   'existence/b/0': 'yes', 'existence/b/1': 'Yes',  # b: one right
                   'code_reasoning/c/0': 'Yes', 'code_reasoning/c/1': 'maybe'}  # 'other'
    summary = evaluate('mme', samples, stub(predictions), progress=False)['summary']
    assert summary['existence/acc'] == 75.0 and summary['existence/acc_plus'] == 50.0
    assert summary['existence/score'] == 125.0
    assert summary['code_reasoning/acc'] == 50.0 and summary['code_reasoning/acc_plus'] == 0.0
    assert summary['perception'] == 125.0 and summary['cognition'] == 50.0


def test_vqa_accuracy_normalisation_and_textvqa(tmp_path):
    assert normalize_vqa_answer('The Two Dogs!') == '2 dogs'
    assert normalize_vqa_answer('dont, 3.5.') == "don't 3.5"
    answers_1 = ['two'] * 2 + ['2'] + ['three'] * 7  # 3 annotators said 2
    # leaving out one of the 3 matches: 2/3, else 1 -> (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy('Two.', answers_1) == pytest.approx(0.9)
    answers_2 = ['a dog'] + ['cat'] * 9  # 1 annotator: (9 * 1/3 + 0) / 10
    assert vqa_accuracy('the dog', answers_2) == pytest.approx(0.3)
    assert vqa_accuracy('cat', answers_2) == 1.0
    path = tmp_path / 'TextVQA_0.5.1_val.json'
    path.write_text(json.dumps({'dataset_name': 'textvqa', 'data': [
        dict(question_id=1, question='How many?', image_id='x1', answers=answers_1),
        dict(question_id=2, question='What animal?', image_id='x2', answers=answers_2)]}))
    samples = load_benchmark('textvqa', str(path), 'train_images')
    assert samples[0]['image'] == 'train_images/x1.jpg'
    summary = evaluate('textvqa', samples, stub({1: 'Two.', 2: 'the dog'}), progress=False)
    assert summary['summary']['accuracy'] == pytest.approx(60.0)


def b64_png():
    buffer = io.BytesIO()
    Image.new('RGB', (20, 20), (0, 0, 255)).save(buffer, format='PNG')
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_circular(tmp_path):
    header = 'index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n'
    rows = [f'0\tWhich colour?\tLook closely.\tred\tblue\tgreen\t\tB\tcolour\t{b64_png()}\n',
            f'1\tWhich shape?\tnan\tcircle\tsquare\ttriangle\tcross\tD\tshape\t{b64_png()}\n']
    path = tmp_path / 'mmbench_dev.tsv'
    path.write_text(header + ''.join(rows))
    samples = load_benchmark('mmbench', str(path))
    assert len(samples) == 3 + 4  # one copy per circular shift of the options
    shifted = next(s for s in samples if s['id'] == 1_000_000)  # question 0, shift 1
    assert shifted['prompt'] == ("Look closely.\nWhich colour?\nA. blue\nB. green\nC. red\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert shifted['answer'] == 'A'
    predictions = {s['id']: f"{s['answer']}." for s in samples}
    predictions[2_000_001] = 'A'  # question 1 misses one of its 4 shifts
    result = evaluate('mmbench', samples, stub(predictions), progress=False)
    summary = result['summary']
    assert summary['circular_accuracy'] == 50.0
    assert summary['row_accuracy'] == pytest.approx(600 / 7)
    assert summary['colour/accuracy'] == 100.0 and summary['shape/accuracy'] == 0.0
    assert all('image_b64' not in r for r in result['records'])


def test_scienceqa_img_gqa_seedbench(tmp_path):
    problems = {
        '1': dict(question='Which is a mammal?', choices=['cat', 'fish'], answer=0,
                  hint='Animals.', image='image.png', split='test', subject='natural science'),
        '2': dict(question='Which is hot?', choices=['ice', 'snow', 'fire'], answer=2, hint='',
                  image='image.png', split='test', subject='natural science'),
        '3': dict(question='No image', choices=['a', 'b'], answer=0, hint='', image=None,
                  split='test'),
        '4': dict(question='Train', choices=['a', 'b'], answer=0, hint='', image='image.png',
                  split='train'),
    }
    path = tmp_path / 'problems.json'
    path.write_text(json.dumps(problems))
    samples = load_benchmark('scienceqa', str(path), 'test')
    assert [s['id'] for s in samples] == ['1', '2'] and samples[0]['image'] == 'test/1/image.png'
    assert samples[0]['prompt'].startswith('Context: Animals.\nWhich is a mammal?\nA. cat\nB. fish')
    summary = evaluate('scienceqa', samples, stub({'1': '(A) cat', '2': 'B'}), progress=False)
    assert summary['summary']['accuracy'] == 50.0

    gqa = tmp_path / 'testdev_balanced_questions.json'
    gqa.write_text(json.dumps({
        'q1': dict(imageId='n1', question='Is it red?', answer='yes'),
        'q2': dict(imageId='n2', question='What is on it?', answer='table'),
        'q3': dict(imageId='n3', question='Which side?', answer='left')}))
    samples = load_benchmark('gqa', str(gqa), 'images')
    assert samples[1]['image'] == 'images/n2.jpg'
    summary = evaluate('gqa', samples, stub({'q1': 'Yes.', 'q2': 'The table', 'q3': 'right'}),
                       progress=False)['summary']
    assert summary['accuracy'] == pytest.approx(200 / 3)

    seed = tmp_path / 'SEED-Bench.json'
    question = dict(choice_a='w', choice_b='x', choice_c='y', choice_d='z', data_type='image')
    seed.write_text(json.dumps({'question_type': {'Scene Understanding': 1, 'Instance Counting': 5},
                                'questions': [
        dict(question, question_id='s1', question='Q1?', answer='A', data_id='1.jpg',
             question_type_id=1),
        dict(question, question_id='s2', question='Q2?', answer='C', data_id='2.jpg',
             question_type_id=5),
        dict(question, question_id='s3', question='Q3?', answer='D', data_id='3.jpg',
             question_type_id=5),
        dict(question, question_id='v1', question='Video?', answer='A', data_id='v.mp4',
             data_type='video', question_type_id=5)]}))
    samples = load_benchmark('seedbench', str(seed), 'SEED-Bench-image')
    assert len(samples) == 3
    summary = evaluate('seedbench', samples, stub({'s1': 'A', 's2': 'C.', 's3': 'The answer is D'}),
                       progress=False)['summary']
    assert summary['accuracy'] == pytest.approx(200 / 3)  # 'The answer is D' names no letter first
    assert summary['Scene Understanding/accuracy'] == 100.0
    assert summary['Instance Counting/accuracy'] == 50.0


def test_bad_benchmark_files_fail_clearly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='benchmark file not found'):
        load_benchmark('pope', str(tmp_path / 'missing.jsonl'))
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"question_id": 1, "text": "hi"}\n')
    with pytest.raises(ValueError, match='line 1: not a POPE question'):
        load_benchmark('pope', str(bad))
    tsv = tmp_path / 'x.tsv'
    tsv.write_text('a\tb\n1\t2\n')
    with pytest.raises(ValueError, match='not an MMBench TSV'):
        load_benchmark('mmbench', str(tsv))
    assert main(['eval', 'm', '--bench', 'nope', '--data', str(bad)]) == 2


def test_mllm_eval_end_to_end_on_pope_with_the_tiny_model(tmp_path, tiny_tokenizer):
    from mllm.engine.config import load_config
    from mllm.evaluation.evaluation import pope_metrics
    from mllm.registry import MODELS

    tokenizer_dir = str(tmp_path / 'tokenizer')
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    options = ['--cfg-options', f'tokenizer.pretrained={tokenizer_dir}']
    torch.manual_seed(0)
    model = MODELS.build(load_config(TINY, {'tokenizer.pretrained': tokenizer_dir}).model)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'iter_1.pth')
    (tmp_path / 'images').mkdir()
    lines = []
    for i, (colour, label) in enumerate([((255, 0, 0), 'yes'), ((0, 0, 255), 'no'),
                                         ((0, 255, 0), 'no')]):
        png(tmp_path / 'images' / f'{i}.png', colour)
        lines.append(dict(question_id=i, image=f'{i}.png', text='Is the shape red?', label=label,
                          category='random'))
    (tmp_path / 'pope.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    out = tmp_path / 'out'
    assert main(['eval', TINY, '--checkpoint', str(tmp_path / 'iter_1.pth'), '--bench', 'pope',
                 '--data', str(tmp_path / 'pope.jsonl'), '--image-folder',
                 str(tmp_path / 'images'), '--out', str(out), '--max-new-tokens', '3',
                 *options]) == 0
    records = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
    assert [r['id'] for r in records] == [0, 1, 2]
    assert all(isinstance(r['prediction'], str) and 'correct' in r for r in records)
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['samples'] == 3
    expected = pope_metrics([{k: r[k] for k in ('prediction', 'answer', 'category')}
                             for r in records])
    assert {k: summary[k] for k in expected} == expected
