import json
import os
import os.path as osp
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from mllm.datasets import synthetic
from mllm.datasets.synthetic import (ANSWERS, CATEGORIES, COLOURS, DOT_COLOURS, answer_matches,
                                     generate_synthetic_vqa)

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
    assert set(paths) == {'train', 'val', 'image_folder', 'tokenizer'}
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


def _saturation(arr, corner):
    x0, y0 = synthetic._detail_cell_origin(corner, arr.shape[0])
    return np.ptp(arr[y0, x0])  # the dot is saturated, the background grey


def _dot_features(path, corner, size):
    """(mean colour of the dot pixels at full res, the detail's 64-px pixel after area / bicubic resize)."""
    f = size // 64
    x0, y0 = synthetic._detail_cell_origin(corner, size)
    with Image.open(path) as im:
        full = np.asarray(im, dtype=float)[y0:y0 + f // 2, x0:x0 + f // 2].reshape(-1, 3).mean(0)
        area = np.asarray(im.reduce(f), dtype=float)[y0 // f, x0 // f]
        bicubic = np.asarray(im.resize((64, 64), Image.BICUBIC), dtype=float)[y0 // f, x0 // f]
    return full, area, bicubic


def _nearest(palette, x):
    return DOT_COLOURS[int(np.argmin(((palette - x) ** 2).sum(1)))]


def test_fine_detail_legible_at_full_res_not_at_64px(small_set):
    _, paths, train = small_set
    rows, answers = [], []
    for s in (s for s in train if s['category'] == 'fine_detail'):
        path = osp.join(paths['image_folder'], s['image'])
        with Image.open(path) as im:
            arr = np.asarray(im, dtype=float)
        corner = max(synthetic.CORNERS, key=lambda c: _saturation(arr, c))  # the corner is not stored
        rows.append(_dot_features(path, corner, 256))
        answers.append(_qa(s)[1])
    full, area, bicubic = (np.stack(x) for x in zip(*rows))
    palette = np.array([COLOURS[c] for c in DOT_COLOURS], dtype=float)

    def accuracy(feats, refs):
        return np.mean([_nearest(refs, x) == a for x, a in zip(feats, answers)])

    assert accuracy(full, palette) == 1.0  # full resolution: nearest palette colour reads the dot
    assert accuracy(bicubic, palette) < 0.35  # 64 px: the dot is mixed away (chance 0.25)
    # area-downsampled: even class centroids fitted on the scored samples do no better than chance,
    # because the 64-px pixel is identical for every answer
    centroids = np.stack([area[[a == c for a in answers]].mean(0) for c in DOT_COLOURS])
    assert accuracy(area, centroids) < 0.35
    assert np.ptp(area, axis=0).max() == 0


def test_fine_detail_64px_image_independent_of_answer():
    size, rng = 256, random.Random(0)
    params = synthetic._sample_params(rng, 'fine_detail', 'red', size)
    images = []
    for dot in DOT_COLOURS:
        others = [c for c in DOT_COLOURS if c != dot]
        images.append(synthetic._render(dict(params, fine_detail=dot, others=others), size))
    assert len({im.tobytes() for im in images}) == 4  # different at full resolution
    assert len({im.reduce(4).tobytes() for im in images}) == 1  # identical at 64 px (area)


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
    with pytest.raises(ValueError, match='multiple of 128'):
        generate_synthetic_vqa(str(tmp_path), image_size=200)
