import json
import os
import os.path as osp
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

from mllm.datasets import synthetic
from mllm.datasets.synthetic import ANSWERS, CATEGORIES, PATTERNS, answer_matches, generate_synthetic_vqa

SMALL = dict(num_train=300, num_val=40, image_size=256)


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('syn') / 'a')
    paths = generate_synthetic_vqa(out, seed=0, **SMALL)
    with open(paths['train']) as f:
        train = json.load(f)
    return out, paths, train


def _qa(sample):
    human, gpt = sample['conversations']
    assert human['from'] == 'human' and gpt['from'] == 'gpt'
    assert human['value'].startswith('<image>\n')
    return human['value'][len('<image>\n'):], gpt['value']


def _read_tree(out):
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            if name != 'meta.json':
                with open(osp.join(root, name), 'rb') as f:
                    files[osp.relpath(osp.join(root, name), out)] = f.read()
    return files


def test_layout_and_format(small_set):
    out, paths, train = small_set
    assert set(paths) == {'train', 'val', 'image_folder', 'boxes', 'tokenizer'}
    from mllm.datasets.boxes import load_box_file
    boxes = load_box_file(paths['boxes'])
    assert set(boxes) == {s['image'] for s in train} | {f'val/{i:06d}.png'
                                                      for i in range(SMALL['num_val'])}
    for s in train:  # one box per drawn shape, plus the marked patch of fine_detail scenes
        n_shapes = (('one', 'two', 'three', 'four').index(s['conversations'][1]['value']) + 1
                    if s['category'] == 'count' else 1)
        assert boxes[s['image']]['labels'] == ['shape'] * n_shapes + (
            ['box'] if s['category'] == 'fine_detail' else [])
    assert len(train) == SMALL['num_train']
    assert train[0]['id'] == 'train_000000' and train[0]['image'] == 'train/000000.png'
    for s in train:
        assert s['category'] in CATEGORIES and osp.exists(osp.join(paths['image_folder'], s['image']))
    with Image.open(osp.join(paths['image_folder'], train[0]['image'])) as im:
        assert im.size == (256, 256) and im.mode == 'RGB'


def test_deterministic(small_set, tmp_path):
    out, _, _ = small_set
    same = generate_synthetic_vqa(str(tmp_path / 'b'), seed=0, **SMALL)
    other = generate_synthetic_vqa(str(tmp_path / 'c'), seed=1, **SMALL)
    tree = _read_tree(out)
    assert tree == _read_tree(osp.dirname(same['train']))
    other_tree = _read_tree(osp.dirname(other['train']))
    assert other_tree.keys() == tree.keys()
    assert other_tree['train.json'] != tree['train.json']
    assert other_tree['images/train/000000.png'] != tree['images/train/000000.png']


def test_global_rng_untouched(tmp_path):
    state = random.getstate()
    generate_synthetic_vqa(str(tmp_path), num_train=10, num_val=2)
    assert random.getstate() == state


def test_answer_balance(small_set):
    _, _, train = small_set
    by_cat = defaultdict(Counter)
    for s in train:
        by_cat[s['category']][_qa(s)[1]] += 1
    assert set(by_cat) == set(CATEGORIES)
    for cat, counts in by_cat.items():
        assert set(counts) == set(ANSWERS[cat])
        total, k = sum(counts.values()), len(ANSWERS[cat])
        for n in counts.values():
            assert abs(n / total - 1 / k) <= 0.05, (cat, counts)


def test_questions_do_not_leak_answers(small_set):
    """Text-only (blind) model: every question string must see a near-uniform answer distribution."""
    _, _, train = small_set
    by_question = defaultdict(Counter)
    for s in train:
        q, a = _qa(s)
        by_question[(s['category'], q)][a] += 1
    for (cat, q), counts in by_question.items():
        total, k = sum(counts.values()), len(ANSWERS[cat])
        assert set(counts) == set(ANSWERS[cat]), q
        assert max(counts.values()) - min(counts.values()) <= 1, (q, counts)  # balanced by construction
        # empirical I(question; answer) within the category is ~0 bits
        entropy = -sum(n / total * np.log2(n / total) for n in counts.values())
        assert entropy > np.log2(k) - 0.05
        for a in ANSWERS[cat]:
            assert a not in q.lower().split()


def test_tokenizer(small_set):
    _, paths, train = small_set
    tok = AutoTokenizer.from_pretrained(paths['tokenizer'])
    assert len(tok) < 256
    ids = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id}
    assert len(ids) == 4 and None not in ids
    for special in ('<s>', '</s>', '<unk>', '<pad>', '<image>'):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    assert tok('red').input_ids[0] == tok.bos_token_id
    for s in train:
        q, a = _qa(s)
        assert len(tok(a, add_special_tokens=False).input_ids) == 1  # one in-vocab word
        for text in (s['conversations'][0]['value'], a):
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids
            assert tok.decode(ids).split() == text.split()
    chat = (f"A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            f"helpful, detailed, and polite answers to the user's questions. USER: 7 ASSISTANT: red</s>")
    assert tok.unk_token_id not in tok(chat).input_ids


def test_build_tokenizer_vocab_limit():
    with pytest.raises(AssertionError, match='vocab'):
        synthetic.build_tokenizer([f'w{i}' for i in range(300)])


def test_answer_matches():
    assert answer_matches(' Red. ', 'red')
    assert answer_matches('THREE!', 'three')
    assert not answer_matches('red circle', 'red')
    assert not answer_matches('blue', 'red')


def _read_pattern(arr, size=256):
    """Tiny hand-written reader of the fine-detail patch at full resolution.

    Scores pixel-to-pixel sign alternation (consecutive differences of opposite sign) along y and along x
    inside the four corner windows where the patch can be; the main shape never reaches them and the frame
    is 2 px wide, so only the patch alternates.
    """
    grey = arr.astype(float).mean(2)
    w = size * 11 // 64  # patch + frame reach at most margin + 2 jitter cells + patch = 40 px < 44 px
    windows = [grey[ys, xs] for ys in (slice(0, w), slice(size - w, size))
               for xs in (slice(0, w), slice(size - w, size))]

    def alternation(a):
        d = np.diff(a, axis=0)
        return np.maximum(0, -d[:-1] * d[1:]).sum()

    ry = sum(alternation(win) for win in windows)
    rx = sum(alternation(win.T) for win in windows)
    threshold = 1000  # a patch scores > 1e5, everything else 0
    return {(True, False): 'rows', (False, True): 'columns', (True, True): 'checks',
            (False, False): 'plain'}[(ry > threshold, rx > threshold)]


def test_fine_detail_legible_at_full_res(small_set):
    _, paths, train = small_set
    answers, reads = [], []
    for s in (s for s in train if s['category'] == 'fine_detail'):
        with Image.open(osp.join(paths['image_folder'], s['image'])) as im:
            reads.append(_read_pattern(np.asarray(im)))
        answers.append(_qa(s)[1])
    assert len(answers) >= 30 and set(answers) == set(PATTERNS)
    assert np.mean([r == a for r, a in zip(reads, answers)]) == 1.0


def test_fine_detail_scene_independent_of_answer():
    """Nothing but the pattern depends on the answer: same RNG state, same scene parameters."""
    for seed in range(20):
        scenes = [synthetic._sample_params(random.Random(seed), 'fine_detail', a, 256) for a in PATTERNS]
        assert [sc.pop('fine_detail') for sc in scenes] == list(PATTERNS)
        assert all(sc == scenes[0] for sc in scenes)


def _pil(filt):
    return lambda im: np.asarray(im.resize((64, 64), filt), dtype=int)


def _torch_area(im):
    t = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(64, 64), mode='area')[0].permute(1, 2, 0).round().numpy().astype(int)


@pytest.mark.parametrize('name,downsample', [pytest.param(n, d, id=n) for n, d in (
    ('pil_bicubic', _pil(Image.BICUBIC)),  # what LLaVAImageProcessor uses
    ('pil_bilinear', _pil(Image.BILINEAR)), ('pil_lanczos', _pil(Image.LANCZOS)),
    ('pil_hamming', _pil(Image.HAMMING)), ('pil_box', _pil(Image.BOX)), ('torch_area', _torch_area))])
def test_fine_detail_invisible_at_64px(name, downsample):
    """The same scene with each answer: different at 256 px, the same 64-px image (within 2/255)."""
    rng = random.Random(0)
    for _ in range(12):
        params = synthetic._sample_params(rng, 'fine_detail', PATTERNS[0], 256)
        images = [synthetic._render(dict(params, fine_detail=a), 256) for a in PATTERNS]
        assert len({im.tobytes() for im in images}) == len(PATTERNS)
        assert [_read_pattern(np.asarray(im)) for im in images] == list(PATTERNS)
        small = [downsample(im) for im in images]
        diff = max(np.abs(x - small[0]).max() for x in small[1:])
        assert diff <= 2, (name, params, diff)
        if name in ('pil_box', 'torch_area'):  # exact: every 4x4 block has the same mean
            assert diff == 0


def test_cache_via_meta(tmp_path):
    out = str(tmp_path / 'd')
    paths = generate_synthetic_vqa(out, num_train=8, num_val=4)
    with open(osp.join(out, 'meta.json')) as f:
        assert json.load(f)['num_train'] == 8
    os.utime(paths['train'], ns=(1, 1))
    generate_synthetic_vqa(out, num_train=8, num_val=4)  # cached: file left alone
    assert os.stat(paths['train']).st_mtime_ns == 1
    generate_synthetic_vqa(out, num_train=8, num_val=4, overwrite=True)
    assert os.stat(paths['train']).st_mtime_ns != 1
    generate_synthetic_vqa(out, num_train=6, num_val=4)  # other arguments: regenerated, stale images gone
    with open(paths['train']) as f:
        assert len(json.load(f)) == 6
    assert sorted(os.listdir(osp.join(out, 'images', 'train'))) == [f'{i:06d}.png' for i in range(6)]
    os.remove(osp.join(out, 'images', 'val', '000003.png'))  # incomplete set: regenerated
    generate_synthetic_vqa(out, num_train=6, num_val=4)
    assert osp.exists(osp.join(out, 'images', 'val', '000003.png'))


def test_rejects_bad_image_size(tmp_path):
    for size in (200, 128):  # 128 px: 2 px per 64-px cell, too few for the fine detail to vanish
        with pytest.raises(ValueError, match='multiple of 256'):
            generate_synthetic_vqa(str(tmp_path), image_size=size)
