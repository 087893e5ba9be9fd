"""Hostile or unusual data (issue 16, item 5): high-bit-depth images are scaled to 8 bits by
their format's range or refused by name, decompression bombs are named bad samples that
``bad_sample_policy='skip'`` skips, every structural problem of a data file names the file,
line/index and id in ``mllm check-data`` (exit 1), and an empty data file is refused."""
import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mllm.cli import main
from mllm.datasets import DataError, LLaVADataset
from mllm.datasets.image_processing import ImageError, open_rgb, to_rgb
from helpers import TINY, run_mllm

# 16-bit values and their 8-bit scaling by the format's range (v * 255 / 65535, rounded):
# 257 * k -> k exactly; PIL's own convert('RGB') clips them all but 0 to 255 (white)
SIXTEEN_BIT = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
EIGHT_BIT = [0, 100, 255, 4]


def png_header(width, height):
    """A PNG that claims ``width`` x ``height`` but holds almost no pixel data: what a
    decompression bomb looks like before it is decoded (and cheap to write)."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
            + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))


def dataset(files, tokenizer, processor, **kwargs):
    return LLaVADataset(files['json'], tokenizer=tokenizer, template='vicuna_v1',
                        image_processor=processor, image_folder=files['image_folder'], **kwargs)


def image_path(files, name='red.png'):
    return os.path.join(files['image_folder'], name)


def grey(image):
    """The first channel of an RGB image as a list (greyscale: all channels are equal)."""
    pixels = np.asarray(image)
    assert image.mode == 'RGB' and (pixels == pixels[..., :1]).all()
    return pixels[..., 0].ravel().tolist()


# ---------------------------------------------------------------- high bit depth

@pytest.mark.parametrize('fmt', ['PNG', 'TIFF', 'PPM'])  # PIL modes I;16, I;16 and I
def test_16bit_files_are_scaled_by_the_format_range(fmt, tmp_path):
    path = str(tmp_path / f'scan.{fmt.lower()}')
    Image.fromarray(SIXTEEN_BIT).save(path, fmt)
    assert grey(open_rgb(path)) == EIGHT_BIT
    with Image.open(path) as image:
        assert grey(image.convert('RGB')) != EIGHT_BIT  # what PIL alone does


@pytest.mark.parametrize('mode', ['I;16', 'I;16L', 'I;16B'])
def test_16bit_images_in_memory_are_scaled_by_the_format_range(mode):
    dtype = '>u2' if mode == 'I;16B' else '<u2'
    image = Image.frombytes(mode, (4, 1), SIXTEEN_BIT.astype(dtype).tobytes())
    assert grey(to_rgb(image)) == EIGHT_BIT
    # scaled by the format's range, not stretched to the image's own min/max
    dark = Image.frombytes(mode, (2, 1), np.array([0, 257 * 10], dtype).tobytes())
    assert grey(to_rgb(dark)) == [0, 10]


def test_16bit_png_reaches_training_chat_and_eval_scaled(tiny_llava_files, tiny_tokenizer,
                                                        tiny_image_processor):
    from mllm.evaluation.benchmarks import open_image
    from mllm.inference.inference import load_image

    path = image_path(tiny_llava_files)
    Image.fromarray(np.full((32, 32), 257 * 40, np.uint16)).save(path)  # I;16
    ds = dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor)
    expected = tiny_image_processor(Image.new('RGB', (32, 32), (40, 40, 40)))
    assert set(grey(ds.load_image(0))) == {40}
    assert (ds[0]['pixel_values'] - expected).abs().max() < 1e-6
    assert set(grey(load_image(path))) == {40}  # mllm chat / eval with image files
    with open(path, 'rb') as f:  # eval: MMBench's base64 images
        b64 = base64.b64encode(f.read()).decode()
    assert set(grey(open_image(dict(id=7, image_b64=b64)))) == {40}
    # a processor handed a 16-bit image directly scales it too
    with Image.open(path) as image:
        assert image.mode == 'I;16'
        assert (tiny_image_processor(image) - expected).abs().max() < 1e-6


@pytest.mark.parametrize('dtype, kind', [(np.int32, 'integer'), (np.float32, 'float')])
def test_32bit_images_are_refused_naming_the_file(dtype, kind, tiny_llava_files,
                                                 tiny_tokenizer, tiny_image_processor):
    path = image_path(tiny_llava_files, 'red.tif')
    Image.fromarray(SIXTEEN_BIT.astype(dtype)).save(path)
    mode = 'I' if kind == 'integer' else 'F'
    with pytest.raises(ImageError, match=f"image {path} has 32-bit {kind} pixels "
                                         f"\\(mode '{mode}'\\) with no value range"):
        open_rgb(path)
    tiny_llava_files['samples'][0]['image'] = 'red.tif'
    with open(tiny_llava_files['json'], 'w') as f:
        json.dump(tiny_llava_files['samples'], f)
    with pytest.raises(DataError, match=r'index 0 \(id s0\): image .*red.tif has 32-bit'):
        dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor)[0]


# ---------------------------------------------------------------- decompression bombs

def test_image_over_max_image_pixels_is_refused_from_its_header(tiny_llava_files, tiny_tokenizer,
                                                               tiny_image_processor):
    with open(image_path(tiny_llava_files), 'wb') as f:
        f.write(png_header(5000, 5000))  # 25 MP: under PIL's limit, over ours
    ds = dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor, max_image_pixels=10 ** 6)
    # decoding it would fail with 'truncated': the header alone decided
    with pytest.raises(DataError, match=r'data.json: index 0 \(id s0\): image .*red.png is '
                                        r'5000x5000 = 25000000 pixels, more than '
                                        r'max_image_pixels=1000000 \(a decompression bomb\?\)'):
        ds[0]
    assert ds.load_image(1).size == (40, 20)  # a normal image still passes


@pytest.mark.parametrize('case', ['30000_square_png', 'pil_limit_lowered'])
def test_decompression_bomb_is_a_named_bad_sample_that_skip_skips(case, tiny_llava_files,
                                                                  tiny_tokenizer,
                                                                  tiny_image_processor,
                                                                  monkeypatch):
    if case == '30000_square_png':  # PIL refuses it at open, before our limit is asked
        with open(image_path(tiny_llava_files), 'wb') as f:
            f.write(png_header(30000, 30000))
        kwargs = dict(max_image_pixels=10 ** 12)
    else:  # a real 32x32 image over twice PIL's own (lowered) limit: DecompressionBombError
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 450)  # the 40x20 image passes
        kwargs = {}
    ds = dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor, **kwargs)
    with pytest.raises(DataError, match=r'index 0 \(id s0\): cannot decode image .*red.png '
                                        r'\(Image size \(\d+ pixels\) exceeds limit'):
        ds[0]
    skip = dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor, **kwargs,
                   bad_sample_policy='skip', max_skipped_ratio=0.5)
    assert skip[0]['index'] == 1  # the next readable sample stands in
    assert skip.skipped == {0}


def test_decompression_bomb_in_chat_names_the_file(tmp_path):
    from mllm.inference.inference import load_image

    path = tmp_path / 'bomb.png'
    path.write_bytes(png_header(30000, 30000))
    with pytest.raises(ValueError, match=f'cannot decode image {path} .*decompression bomb'):
        load_image(str(path))


# ---------------------------------------------------------------- check-data: structure


def check_data(path, files, tokenizer_dir, *extra):
    return main(['check-data', TINY, '--data', str(path), '--image-folder', files['image_folder'],
                 *extra, '--cfg-options', f'tokenizer.pretrained={tokenizer_dir}'])


def write(files, name, samples):
    """Samples as a JSON list (.json) or one per line (.jsonl); returns the path."""
    path = os.path.join(files['root'], name)
    with open(path, 'w') as f:
        if name.endswith('.jsonl'):
            f.write(''.join(json.dumps(s) + '\n' for s in samples))
        else:
            json.dump(samples, f)
    return path


@pytest.mark.parametrize('name, place', [('data.json', 'index 1'), ('data.jsonl', 'line 2')])
def test_check_data_names_a_sample_that_is_not_an_object(name, place, tiny_llava_files,
                                                         tokenizer_dir, capsys):
    samples = tiny_llava_files['samples']
    path = write(tiny_llava_files, name, [samples[0], 'just a string', samples[2]])
    assert check_data(path, tiny_llava_files, tokenizer_dir) == 1
    err = capsys.readouterr().err
    assert f'{path}: {place}: a sample must be an object, got str' in err
    assert check_data(path, tiny_llava_files, tokenizer_dir, '--json') == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert dict(file=path, place=place, id=None,
                problem='a sample must be an object, got str') in records


@pytest.mark.parametrize('name, place', [('data.json', 'index 1'), ('data.jsonl', 'line 2')])
def test_check_data_names_samples_that_are_not_utf8(name, place, tiny_llava_files,
                                                    tiny_tokenizer, tiny_image_processor,
                                                    tokenizer_dir, capsys):
    samples = tiny_llava_files['samples']
    path = write(tiny_llava_files, name, [samples[0], dict(samples[2], id='bad-LATIN1'),
                                          samples[3]])
    with open(path, 'rb') as f:
        data = f.read().replace(b'LATIN1', 'café'.encode('latin-1'))  # é: byte 0xe9
    with open(path, 'wb') as f:
        f.write(data)
    message = f'{path}: 1 sample(s) hold bytes that are not UTF-8 — {place} (id bad-caf\\xe9)'
    assert check_data(path, tiny_llava_files, tokenizer_dir) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(DataError) as err:  # training: at construction
        LLaVADataset(path, tokenizer=tiny_tokenizer, template='vicuna_v1',
                     image_processor=tiny_image_processor)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize('content', ['[]', '', '\n\n'])
def test_check_data_refuses_an_empty_data_file(content, tiny_llava_files, tokenizer_dir, capsys):
    name = 'empty.json' if content == '[]' else 'empty.jsonl'
    path = os.path.join(tiny_llava_files['root'], name)
    with open(path, 'w') as f:
        f.write(content)
    assert check_data(path, tiny_llava_files, tokenizer_dir) == 1
    assert f'{path}: the file holds no samples' in capsys.readouterr().err
    assert check_data(path, tiny_llava_files, tokenizer_dir, '--json') == 1
    record = json.loads(capsys.readouterr().out)
    assert record['file'] == path and 'the file holds no samples' in record['problem']


def test_check_data_warns_about_duplicate_ids(tiny_llava_files, tokenizer_dir, capsys):
    samples = tiny_llava_files['samples']
    path = write(tiny_llava_files, 'dup.jsonl', [samples[0], samples[1], dict(samples[3], id='s0')])
    assert check_data(path, tiny_llava_files, tokenizer_dir) == 0  # a warning alone: exit 0
    captured = capsys.readouterr()
    assert f"{path}: warning: duplicate id 's0' at line 1 and line 3" in captured.err
    assert '0 problem(s), 1 duplicate id(s)' in captured.out
    assert check_data(path, tiny_llava_files, tokenizer_dir, '--json') == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert dict(file=path, place='line 3', id='s0', warning='duplicate id, first at line 1') \
        in records
    assert records[-1] == dict(file=path, samples=3, problems=0)


# ---------------------------------------------------------------- train: empty dataset

def test_train_refuses_an_empty_dataset(tiny_llava_files, tiny_tokenizer, tiny_image_processor,
                                        tokenizer_dir, tmp_path):
    path = write(tiny_llava_files, 'empty.json', [])
    with pytest.raises(DataError, match=f'^{path}: the file holds no samples'):
        LLaVADataset(path, tokenizer=tiny_tokenizer, template='vicuna_v1',
                     image_processor=tiny_image_processor)
    # in a subprocess, as the other CLI trainings: a runner binds MMEngine's global logger
    result = run_mllm('train', TINY, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                      f'train_dataloader.dataset.data_path={path}',
                      f'train_dataloader.dataset.image_folder={tiny_llava_files["image_folder"]}',
                      f'tokenizer.pretrained={tokenizer_dir}', 'train_cfg.max_iters=1')
    assert result.returncode == 1
    assert f'mllm train: error: {path}: the file holds no samples' in result.stderr
