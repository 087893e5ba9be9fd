"""The offline tokenisation cache of LLaVADataset: identical samples to on-the-fly encoding,
reused when its key matches, rebuilt when the data, tokenizer or template change."""
import json
import os

import pytest
import torch

from mllm.datasets import token_cache
from mllm.datasets.image_processing import LLaVAImageProcessor
from mllm.datasets.llava import DataError, LLaVADataset
from mllm.datasets.synthetic import build_tokenizer


def _dataset(files, tokenizer, cache=None, path=None, **kwargs):
    kwargs.setdefault('image_processor', LLaVAImageProcessor(size=32, token_stride=8))
    return LLaVADataset(path or files['json'], tokenizer=tokenizer, template='vicuna_v1',
                        image_folder=files['image_folder'], token_cache=cache, **kwargs)


def _same(a, b):
    for key in ('input_ids', 'labels', 'pixel_values'):
        if a[key] is None or b[key] is None:
            assert a[key] is b[key] is None
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize('keep_aspect', [False, True])
def test_cache_gives_on_the_fly_samples(tiny_llava_files, tiny_tokenizer, tmp_path,
                                        keep_aspect, monkeypatch):
    """Every sample, with image-token counts that differ per image (keep_aspect) and with
    truncation, equals on-the-fly encoding; a second dataset reads the cache back."""
    processor = LLaVAImageProcessor(size=32, token_stride=8, keep_aspect=keep_aspect)
    cache, lengths = str(tmp_path / 'cache'), set()
    for max_length in (2048, 30):
        online = _dataset(tiny_llava_files, tiny_tokenizer, image_processor=processor,
                          max_length=max_length)
        cached = _dataset(tiny_llava_files, tiny_tokenizer, cache, image_processor=processor,
                          max_length=max_length)
        assert cached.token_cache is not None
        for i in range(len(online)):
            try:
                expected = online[i]
            except DataError as err:  # the image run does not fit: same error, same sample
                with pytest.raises(DataError, match='max_length=30') as cached_err:
                    cached[i]
                assert str(cached_err.value) == str(err)
                continue
            _same(cached[i], expected)
            lengths.add(len(expected['input_ids']))
    assert 30 in lengths  # truncation did happen
    assert len(os.listdir(cache)) == 1  # one key: max_length and the processor are not in it
    monkeypatch.setattr(token_cache, 'build_cache', lambda *a: pytest.fail('rebuilt'))
    _dataset(tiny_llava_files, tiny_tokenizer, cache, image_processor=processor)


def test_cache_stores_one_sentinel_per_image(tiny_llava_files, tiny_tokenizer, tmp_path):
    cached = _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'c')).token_cache
    for i, sample in enumerate(tiny_llava_files['samples']):
        ids = cached.ids[cached.offsets[i]:cached.offsets[i + 1]]
        assert (ids == -200).sum() == (1 if sample.get('image') else 0)


def test_cache_key_follows_data_tokenizer_and_template(tiny_llava_files, tiny_tokenizer,
                                                       tmp_path):
    cache = str(tmp_path / 'cache')
    _dataset(tiny_llava_files, tiny_tokenizer, cache)
    _dataset(tiny_llava_files, build_tokenizer(['What colour is']), cache)  # other vocabulary
    LLaVADataset(tiny_llava_files['json'], tokenizer=tiny_tokenizer, template='plain',
                 image_processor=LLaVAImageProcessor(size=32, token_stride=8),
                 image_folder=tiny_llava_files['image_folder'], token_cache=cache)
    samples = tiny_llava_files['samples']
    samples[0]['conversations'][1]['value'] = 'It is green.'
    edited = tmp_path / 'edited.json'
    edited.write_text(json.dumps(samples))
    changed = _dataset(tiny_llava_files, tiny_tokenizer, cache, path=str(edited))
    assert len(os.listdir(cache)) == 4
    _same(changed[0], _dataset(tiny_llava_files, tiny_tokenizer, path=str(edited))[0])
    _dataset(tiny_llava_files, tiny_tokenizer, cache)  # the first key again: reused
    assert len(os.listdir(cache)) == 4


def test_cache_keeps_encoding_errors(tiny_llava_files, tiny_tokenizer, tmp_path):
    """A sample that cannot be encoded fails on read with the on-the-fly message, so
    bad_sample_policy works the same."""
    samples = tiny_llava_files['samples']
    samples[2]['conversations'] = samples[2]['conversations'][:1]  # ends with a human turn
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(samples))
    online = _dataset(tiny_llava_files, tiny_tokenizer, path=str(path))
    cached = _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'c'), path=str(path))
    with pytest.raises(DataError) as expected:
        online[2]
    with pytest.raises(DataError) as got:
        cached[2]
    assert 'index 2 (id s2)' in str(got.value) and str(got.value) == str(expected.value)
    skipping = _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'c'), path=str(path),
                        bad_sample_policy='skip', max_skipped_ratio=0.5)
    assert skipping[2]['index'] == 3


def test_first_use_builds_with_a_progress_bar(tiny_llava_files, tiny_tokenizer, tmp_path, capsys):
    """The cache builds itself on first use and says how far it is (stderr, rank 0)."""
    _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'cache'))
    err = capsys.readouterr().err
    assert 'token cache' in err and '100%' in err
    _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'cache'))  # read back: no bar
    assert 'token cache' not in capsys.readouterr().err


def test_sample_lengths_match_encoded_samples(tiny_llava_files, tiny_tokenizer, tmp_path):
    """Lengths read from the cache arrays alone equal the encoded samples' lengths."""
    processor = LLaVAImageProcessor(size=32, token_stride=8)
    dataset = _dataset(tiny_llava_files, tiny_tokenizer, str(tmp_path / 'cache'),
                       image_processor=processor)
    lengths = token_cache.sample_lengths(dataset.token_cache)
    visual = processor.num_visual_tokens((32, 32))
    for i in range(len(dataset)):
        encoded = dataset.encode(i)
        assert (lengths['text'][i] + lengths['images'][i] * visual
                == len(encoded['input_ids'])), i
        assert lengths['learned'][i] == int((encoded['labels'] != -100).sum()), i
