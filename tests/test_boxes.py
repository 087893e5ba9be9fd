"""Box files and ``mllm annotate-boxes``: format validation, geometry checks, MG-LLaVA's
per-label NMS 0.2 and per-label cap, the mapping of OWL boxes back to original pixels, and the
CLI end to end on tiny random OWLv2 / OWL-ViT detectors written with ``save_pretrained``."""
import json
import os
import shutil
import string

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mllm.cli import main
from mllm.datasets.annotate import BoxAnnotator
from mllm.datasets.boxes import (BoxFileError, box_problems, cap_per_label, clip_boxes,
                                 filter_boxes, load_box_file, nms_per_label, write_box_file)

LABELS = ['cat', 'dog', 'red square']


def _tiny_clip_tokenizer(folder):
    """A character-level CLIP BPE tokenizer (no merges); '!' = 0 is OWL's pad token."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits)
    tokens = ['!', '!</w>'] + chars + [c + '</w>' for c in chars] + [
        '<|startoftext|>', '<|endoftext|>']
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    return CLIPTokenizer(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'),
                         pad_token='!', model_max_length=16)


def _save_tiny_owl(folder, kind):
    """A random OWLv2 / OWL-ViT: 64 px images, patch 16 -> 16 boxes per image, 1 layer each."""
    import transformers

    os.makedirs(folder)
    tokenizer = _tiny_clip_tokenizer(folder)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=64, patch_size=16)
    prefix = {'owlv2': 'Owlv2', 'owlvit': 'OwlViT'}[kind]
    config = getattr(transformers, prefix + 'Config')(text_config=text, vision_config=vision,
                                                     projection_dim=32)
    torch.manual_seed(0)
    model = getattr(transformers, prefix + 'ForObjectDetection')(config)
    with torch.no_grad():  # transformers 5 draws the box head at std 1: saturated, zero-area
        for param in model.box_head.parameters():  # random boxes; 4.x drew small weights
            param.normal_(0, 0.02) if param.dim() == 2 else param.zero_()
    model.save_pretrained(folder)
    image_processor = getattr(transformers, prefix + 'ImageProcessor')(
        size={'height': 64, 'width': 64}, crop_size={'height': 64, 'width': 64})
    getattr(transformers, prefix + 'Processor')(image_processor=image_processor,
                                                tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def owlv2_dir(tmp_path_factory):
    return _save_tiny_owl(tmp_path_factory.mktemp('det') / 'owlv2', 'owlv2')


@pytest.fixture(scope='module')
def owlvit_dir(tmp_path_factory):
    return _save_tiny_owl(tmp_path_factory.mktemp('det') / 'owlvit', 'owlvit')


# image key -> (width, height): square, wide, tall in a sub-folder
IMAGE_SIZES = {'a.png': (64, 64), 'sub/tall.png': (40, 90), 'wide.jpg': (120, 50)}


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / 'images'
    for i, (key, size) in enumerate(IMAGE_SIZES.items()):
        os.makedirs(folder / os.path.dirname(key), exist_ok=True)
        Image.new('RGB', size, (200, 40 * i, 30)).save(folder / key)
    (folder / 'notes.txt').write_text('not an image')
    return folder


def _annotate(image_dir, out, detector, *extra):
    return main(['annotate-boxes', '--images', str(image_dir), '--out', str(out),
                 '--detector', detector, '--labels', ','.join(LABELS), '--no-progress',
                 '--workers', '0', *extra])  # later options win


# ---- the command on a tiny random detector ----------------------------------------------

def test_cli_writes_an_entry_per_image_inside_bounds(owlv2_dir, image_dir, tmp_path, capsys):
    out = tmp_path / 'boxes.json'
    assert _annotate(image_dir, out, owlv2_dir, '--threshold', '0', '--batch-size', '2',
                     '--workers', '2', '--dtype', 'bfloat16') == 0
    entries = load_box_file(str(out))
    assert sorted(entries) == sorted(IMAGE_SIZES)  # sub-folder key with '/', notes.txt ignored
    total = 0
    for key, entry in entries.items():
        width, height = IMAGE_SIZES[key]
        assert entry['boxes'] and box_problems(entry, width, height) == []
        assert set(entry['labels']) <= set(LABELS)
        assert entry['scores'] == sorted(entry['scores'], reverse=True)
        boxes = torch.tensor(entry['boxes'])
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        same_label = torch.tensor([[a == b for b in entry['labels']] for a in entry['labels']])
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou[same_label] <= 0.2 + 1e-6).all()  # NMS 0.2 within a label
        total += len(boxes)
    assert f'3 images, {total} boxes, 0 images with no box' in capsys.readouterr().out
    assert not os.path.exists(str(out) + '.partial')


def test_cli_empty_entries_when_nothing_passes(owlv2_dir, image_dir, tmp_path, capsys):
    out = tmp_path / 'boxes.json'
    argv = ['annotate-boxes', '--images', str(image_dir), '--out', str(out), '--detector',
            owlv2_dir, '--labels', 'cat', '--threshold', '1', '--workers', '0']
    assert main(argv) == 0
    assert json.loads(out.read_text()) == {
        key: {'boxes': [], 'labels': [], 'scores': []} for key in sorted(IMAGE_SIZES)}
    captured = capsys.readouterr()
    assert '3 images, 0 boxes, 3 images with no box' in captured.out
    assert '100%' in captured.err and '3/3' in captured.err  # the progress bar


def test_cli_bad_input_exits_nonzero_naming_it(owlv2_dir, image_dir, tmp_path, capsys):
    out = tmp_path / 'boxes.json'
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'clip').mkdir()
    (tmp_path / 'clip' / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
    mismatched = tmp_path / 'mismatched'
    shutil.copytree(owlv2_dir, mismatched)
    if (mismatched / 'preprocessor_config.json').exists():  # transformers 4.x
        config = json.loads((mismatched / 'preprocessor_config.json').read_text())
        config['size'] = {'height': 32, 'width': 32}
        (mismatched / 'preprocessor_config.json').write_text(json.dumps(config))
    else:  # transformers 5 nests it in processor_config.json
        config = json.loads((mismatched / 'processor_config.json').read_text())
        config['image_processor']['size'] = {'height': 32, 'width': 32}
        (mismatched / 'processor_config.json').write_text(json.dumps(config))
    good = {'--images': str(image_dir), '--detector': owlv2_dir, '--labels': 'cat'}
    cases = [  # (what replaces the good argument, expected message)
        ({'--images': str(tmp_path / 'nope')}, f"{tmp_path / 'nope'}: image folder not found"),
        ({'--images': str(tmp_path / 'empty')}, f"{tmp_path / 'empty'}: no images"),
        ({'--detector': str(tmp_path / 'missing')}, f"{tmp_path / 'missing'}: detector folder"),
        ({'--detector': str(tmp_path / 'clip')},
         f"{tmp_path / 'clip'}: model_type 'clip' is not an OWL detector"),
        ({'--detector': str(mismatched)}, 'but the model expects 64x64'),
        ({'--labels': ' , '}, '--labels: no labels given'),
    ]
    for override, message in cases:
        argv = ['annotate-boxes', '--out', str(out), '--no-progress']
        for key, value in {**good, **override}.items():
            argv += [key, value]
        assert main(argv) == 1, override
        err = capsys.readouterr().err
        assert message in err, (override, err)
    argv = ['annotate-boxes', '--out', str(out), '--images', str(image_dir), '--detector',
            owlv2_dir, '--labels-file', str(tmp_path / 'labels.txt')]
    assert main(argv) == 1 and 'labels.txt: cannot read labels file' in capsys.readouterr().err
    assert not out.exists()


def test_cli_unreadable_image_keeps_progress_and_resumes(owlv2_dir, image_dir, tmp_path,
                                                        capsys):
    out = tmp_path / 'boxes.json'
    out.write_text('previous file')
    bad = image_dir / 'b_bad.png'
    bad.write_bytes(b'not a png')
    assert _annotate(image_dir, out, owlv2_dir) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and 'cannot read image' in err
    assert out.read_text() == 'previous file'  # never half-written, never clobbered on failure
    partial = tmp_path / 'boxes.json.partial'
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert lines[0]['settings']['labels'] == LABELS
    # the rest of the bad image's batch is annotated and saved
    assert sorted(line['image'] for line in lines[1:]) == sorted(IMAGE_SIZES)
    # other settings must not mix with the saved progress
    assert _annotate(image_dir, out, owlv2_dir, '--threshold', '0.3') == 1
    assert 'other settings (threshold)' in capsys.readouterr().err
    with open(partial, 'a') as f:
        f.write('{"image": "c.png", "boxes": [[1, 2')  # a run killed mid-line
    Image.new('RGB', (30, 20)).save(bad)
    assert _annotate(image_dir, out, owlv2_dir) == 0
    resumed = capsys.readouterr().out
    assert 'resuming from' in resumed and '3 of 4 images done' in resumed
    entries = load_box_file(str(out))
    assert sorted(entries) == sorted([*IMAGE_SIZES, 'b_bad.png'])
    assert entries[lines[1]['image']]['boxes'] == lines[1]['boxes']
    assert not os.path.exists(str(out) + '.partial')


# ---- mapping normalised OWL boxes back to original pixels --------------------------------

def _fixed_detections(pred_boxes, logits):
    """Stands in for ``BoxAnnotator._detect``: known normalised (cx, cy, w, h) boxes, logits."""
    def detect(pixel_values):
        batch = len(pixel_values)
        return logits.expand(batch, -1, -1), pred_boxes.expand(batch, -1, -1)
    return detect


# cat at (0.25, 0.25); a dog entirely below y=1/2; a dog reaching past the right edge
NORMALISED = torch.tensor([[[0.25, 0.25, 0.1, 0.1], [0.5, 0.75, 0.2, 0.1],
                            [0.9, 0.45, 0.3, 0.1]]])
LOGITS = torch.tensor([[[2.0, -5, -5], [-5, 3.0, -5], [-5, 1.0, -5]]])  # (1, P=3, Q=3)


@pytest.mark.parametrize('kind, expected', [
    # OWLv2 pads 200x100 to 200x200 at the bottom: both axes are fractions of 200, the
    # second box lies in the padding (dropped), the third is clipped at x = 200
    ('owlv2', [[40.0, 40.0, 60.0, 60.0], [150.0, 80.0, 200.0, 100.0]]),
    # OWL-ViT stretches 200x100 to its square: x in 200ths, y in 100ths
    ('owlvit', [[40.0, 20.0, 60.0, 30.0], [80.0, 70.0, 120.0, 80.0], [150.0, 40.0, 200.0, 50.0]]),
])
def test_boxes_map_to_original_pixels_of_a_non_square_image(kind, expected, request):
    detector = request.getfixturevalue(f'{kind}_dir')
    annotator = BoxAnnotator(detector, LABELS, threshold=0.5)
    annotator._detect = _fixed_detections(NORMALISED, LOGITS)
    [entry] = annotator([Image.new('RGB', (200, 100))])
    labels = {'owlv2': ['cat', 'dog'], 'owlvit': ['dog', 'cat', 'dog']}[kind]
    order = {'owlv2': [0, 1], 'owlvit': [1, 0, 2]}[kind]  # best score first: 3.0, 2.0, 1.0
    assert entry['labels'] == labels
    assert entry['boxes'] == [expected[i] for i in order]  # exact after 0.01 px rounding
    scores = torch.tensor([3.0, 2.0, 1.0]).sigmoid()
    if kind == 'owlv2':
        scores = scores[[1, 2]]  # the 3.0 dog was in the padding
    assert entry['scores'] == pytest.approx(scores.tolist(), abs=1e-4)


@pytest.mark.parametrize('kind', ['owlv2', 'owlvit'])
def test_cached_queries_match_the_models_own_forward(kind, request):
    """Text queries are encoded once; detection with them equals the model's full forward."""
    annotator = BoxAnnotator(request.getfixturevalue(f'{kind}_dir'), LABELS)
    images = [Image.new('RGB', (120, 50), (10, 200, 10)), Image.new('RGB', (30, 70), (9, 9, 9))]
    inputs = annotator.processor(text=[[f'a photo of {x}' for x in LABELS]] * 2, images=images,
                                 return_tensors='pt', truncation=True)
    with torch.no_grad():
        outputs = annotator.model(**inputs)
    logits, pred_boxes = annotator._detect(inputs['pixel_values'])
    assert logits.shape == outputs.logits.shape == (2, 16, len(LABELS))
    torch.testing.assert_close(logits, outputs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred_boxes, outputs.pred_boxes, atol=1e-6, rtol=1e-6)


def test_owlv2_mapping_agrees_with_transformers_post_processing(owlv2_dir):
    """The real tiny model on a wide image: our boxes (no NMS, no cap) equal transformers'
    own post-processing, which scales by the longer side, clipped to the image."""
    image = Image.new('RGB', (120, 50), (10, 200, 10))
    annotator = BoxAnnotator(owlv2_dir, LABELS, threshold=0.0, nms_iou=1.0, cap_above=10**6)
    [entry] = annotator([image])
    processor = annotator.processor
    inputs = processor(text=[[f'a photo of {x}' for x in LABELS]], images=image,
                       return_tensors='pt', truncation=True)
    with torch.no_grad():
        outputs = annotator.model(**inputs)
    post_process = getattr(processor, 'post_process_object_detection', None) or (
        processor.image_processor.post_process_object_detection)  # transformers 5
    [ref] = post_process(outputs, threshold=0.0, target_sizes=[(50, 120)])
    ref_boxes = clip_boxes(ref['boxes'], 120, 50)
    visible = (ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])
    assert 0 < visible.sum() < len(ref_boxes)  # some boxes lie in the padding only
    # rows of boxes share y1 up to float noise (ours are rounded to 0.01 px): key on pixels
    def key(b):
        return [round(b[1]), round(b[0]), round(b[3]), round(b[2])]

    expected = sorted(ref_boxes[visible].tolist(), key=key)
    ours = sorted(entry['boxes'], key=key)
    assert len(ours) == len(expected)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), atol=6e-3, rtol=0)


# ---- NMS and the per-label cap -----------------------------------------------------------

def test_nms_per_label_at_iou_0_2():
    boxes = torch.tensor([[0, 0, 10, 10],   # 0 cat 0.9: kept
                          [1, 0, 11, 10],   # 1 cat 0.8: IoU 0.82 with 0 -> suppressed
                          [1, 0, 11, 10],   # 2 dog 0.7: other label, kept
                          [6, 0, 16, 10],   # 3 cat 0.6: IoU 40/160 = 0.25 with 0 -> suppressed
                          [8, 0, 18, 10],   # 4 cat 0.5: IoU 20/180 = 0.11 with 0 -> kept
                          [0, 0, 10, 1.9],  # 5 cat 0.4: IoU 0.19 with 0 -> kept
                          [0, 0, 10, 2.1]],  # 6 cat 0.3: IoU 0.21 with 0 -> suppressed
                         dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    labels = ['cat', 'cat', 'dog', 'cat', 'cat', 'cat', 'cat']
    assert nms_per_label(boxes, scores, labels, 0.2).tolist() == [0, 2, 4, 5]
    assert nms_per_label(boxes, scores, ['x'] * 7, 0.2).tolist() == [0, 4, 5]  # one label
    # at 0.3, box 3 survives and suppresses 4 (IoU 0.67); 5 suppresses 6 (IoU 0.9)
    assert nms_per_label(boxes, scores, labels, 0.3).tolist() == [0, 2, 3, 5]
    assert nms_per_label(boxes[:0], scores[:0], []).tolist() == []


def _spread_boxes(n):
    """n disjoint boxes (NMS keeps all)."""
    return torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(n)])


def test_cap_applies_only_above_100_boxes_and_keeps_the_best_20_per_label():
    labels = ['a'] * 60 + ['b'] * 30 + ['c'] * 11   # 101 boxes
    scores = torch.rand(101, generator=torch.Generator().manual_seed(0))
    keep = cap_per_label(scores, labels, max_per_label=20, cap_above=100)
    kept = [labels[i] for i in keep.tolist()]
    assert (kept.count('a'), kept.count('b'), kept.count('c')) == (20, 20, 11)
    for label in 'ab':
        mine = [i for i in range(101) if labels[i] == label]
        best = sorted(mine, key=lambda i: -scores[i].item())[:20]
        assert sorted(i for i in keep.tolist() if labels[i] == label) == sorted(best)
    assert scores[keep].tolist() == sorted(scores[keep].tolist(), reverse=True)
    # exactly 100 boxes: no cap
    assert len(cap_per_label(scores[:100], labels[:100], 20, 100)) == 100
    keep = filter_boxes(_spread_boxes(101), scores, labels, 0.2, 20, 100)
    assert len(keep) == 51
    assert len(filter_boxes(_spread_boxes(100), scores[:100], labels[:100])) == 100


def test_cap_counts_boxes_after_nms():
    # 102 boxes, but two are near-duplicates of others: 100 after NMS, so no cap
    boxes = torch.cat([_spread_boxes(100), _spread_boxes(2) + 0.5])
    scores = torch.linspace(1, 0.1, 102)
    labels = ['a'] * 102
    assert len(filter_boxes(boxes, scores, labels)) == 100
    assert len(filter_boxes(boxes, scores, labels, iou_threshold=1.0)) == 20  # 102 > 100


# ---- the file format ---------------------------------------------------------------------

def test_write_and_load_round_trip(tmp_path):
    path = tmp_path / 'boxes.json'
    entries = {'images/000001.jpg': {'boxes': [[1, 2.5, 30, 40]], 'labels': ['dog'],
                                     'scores': [0.91]},
               'images/000002.jpg': {'boxes': [], 'labels': []}}
    write_box_file(str(path), entries)
    assert os.listdir(tmp_path) == ['boxes.json']  # no temporary file left behind
    assert load_box_file(str(path)) == {
        'images/000001.jpg': {'boxes': [[1.0, 2.5, 30.0, 40.0]], 'labels': ['dog'],
                              'scores': [0.91]},
        'images/000002.jpg': {'boxes': [], 'labels': [], 'scores': None}}


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'boxes.json'
    path.write_text('{}')

    def broken_dump(obj, f, **kwargs):
        f.write('{"half')
        raise OSError('disk full')
    monkeypatch.setattr(json, 'dump', broken_dump)
    with pytest.raises(OSError, match='disk full'):
        write_box_file(str(path), {'a.jpg': {'boxes': [], 'labels': []}})
    assert path.read_text() == '{}' and os.listdir(tmp_path) == ['boxes.json']
    monkeypatch.undo()
    with pytest.raises(BoxFileError, match="refusing to write 'a.jpg'"):
        write_box_file(str(path), {'a.jpg': {'boxes': [[0, 0, 1]], 'labels': ['x']}})


@pytest.mark.parametrize('text, message', [
    ('{"img/1.jpg": {"boxes": [[0, 0, 1, 1]], "labels": ["a"]', 'not valid JSON'),
    ('[{"img/1.jpg": 1}]', 'must be a JSON object keyed by image path'),
    ('{"img/1.jpg": {"boxes": [], "labels": []}, "img/1.jpg": {"boxes": [], "labels": []}}',
     "duplicate key 'img/1.jpg'"),
    ('{"img/1.jpg": [[0, 0, 1, 1]]}', "'img/1.jpg': must be an object"),
    ('{"img/1.jpg": {"boxes": []}}', "'img/1.jpg': missing \"labels\""),
    ('{"img/1.jpg": {"boxes": {}, "labels": []}}', "'img/1.jpg': \"boxes\" must be a list"),
    ('{"img/1.jpg": {"boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "labels": ["a"]}}',
     "'img/1.jpg': lengths differ: boxes 2, labels 1"),
    ('{"img/1.jpg": {"boxes": [[0, 0, 1, 1]], "labels": ["a"], "scores": []}}',
     "'img/1.jpg': lengths differ: boxes 1, labels 1, scores 0"),
    ('{"img/1.jpg": {"boxes": [[0, 0, 1]], "labels": ["a"]}}', "'img/1.jpg': box 0 must be"),
    ('{"img/1.jpg": {"boxes": [[0, 0, "1", 1]], "labels": ["a"]}}', 'non-numeric coordinate'),
    ('{"img/1.jpg": {"boxes": [[0, 0, true, 1]], "labels": ["a"]}}', 'non-numeric coordinate'),
    ('{"img/1.jpg": {"boxes": [[0, 0, NaN, 1]], "labels": ["a"]}}', 'non-finite coordinate'),
    ('{"img/1.jpg": {"boxes": [[0, 0, 1, 1]], "labels": [3]}}', "'img/1.jpg': label 0 must be"),
    ('{"img/1.jpg": {"boxes": [[0, 0, 1, 1]], "labels": ["a"], "scores": [Infinity]}}',
     "'img/1.jpg': score 0 must be a finite number"),
])
def test_load_box_file_names_file_and_key(tmp_path, text, message):
    path = tmp_path / 'boxes.json'
    path.write_text(text)
    with pytest.raises(BoxFileError) as err:
        load_box_file(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_load_box_file_missing(tmp_path):
    with pytest.raises(BoxFileError, match='box file not found'):
        load_box_file(str(tmp_path / 'none.json'))


def test_clip_boxes_and_box_problems():
    boxes = [[-5, 10, 50, 40], [10, 10, 110, 60]]
    assert clip_boxes(boxes, 100, 50) == [[0, 10, 50, 40], [10, 10, 100, 50]]
    clipped = clip_boxes(torch.tensor(boxes, dtype=torch.float32), 100, 50)
    assert clipped.dtype == torch.float32
    assert clipped.tolist() == [[0, 10, 50, 40], [10, 10, 100, 50]]
    entry = {'boxes': [[0, 0, 100, 50],       # the whole image: fine
                       [-5, 10, 50, 40],      # reaches left of x = 0
                       [120, 0, 130, 10],     # entirely right of the image
                       [10, 10, 10, 20],      # zero width
                       [20, 20, 10, 10]],     # inverted
             'labels': ['a', 'b', 'c', 'd', 'e']}
    problems = box_problems(entry, 100, 50)
    assert len(problems) == 4
    assert problems[0].startswith("box 1 [-5, 10, 50, 40] ('b') extends outside the 100x50")
    for problem, i in zip(problems[1:], (2, 3, 4)):
        assert problem.startswith(f'box {i} ') and 'degenerate' in problem
    assert box_problems({'boxes': [[0, 0, 1, 1]], 'labels': []}, 10, 10) == [
        'lengths differ: boxes 1, labels 0']
