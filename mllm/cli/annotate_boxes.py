"""``mllm annotate-boxes --images DIR --out boxes.json --detector PATH --labels ...``: boxes for
MG-LLaVA's object tokens from a local OWLv2 / OWL-ViT detector, one entry per image (format:
data/README.md, "Box files"). Each batch is appended to ``OUT.partial`` (JSON lines), and a rerun
with the same settings continues from it; OUT itself is written once, atomically, at the end."""
import argparse
import json
import os
import sys
import time

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {text}')
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {text}')
    return value


def add_arguments(parser):
    parser.add_argument('--images', required=True, metavar='DIR',
                        help='image folder, searched recursively; keys are paths relative to it')
    parser.add_argument('--out', required=True, metavar='FILE', help='box file to write (JSON)')
    parser.add_argument('--detector', required=True, metavar='PATH',
                        help='local folder of an OWLv2 / OWL-ViT model (save_pretrained)')
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument('--labels', help='comma-separated label vocabulary, e.g. "cat,dog"')
    labels.add_argument('--labels-file', metavar='FILE', help='label vocabulary, one per line')
    parser.add_argument('--threshold', type=_fraction, default=0.1,
                        help='keep boxes scoring above this (default 0.1; MG-LLaVA used 0.2)')
    parser.add_argument('--nms-iou', type=_fraction, default=0.2,
                        help='per-label NMS IoU threshold (default 0.2, as MG-LLaVA)')
    parser.add_argument('--max-per-label', type=_positive, default=20,
                        help='boxes kept per label when an image has more than --cap-above')
    parser.add_argument('--cap-above', type=_positive, default=100,
                        help='apply --max-per-label only above this many boxes (default 100)')
    parser.add_argument('--prompt', default='a photo of {}',
                        help="text query per label, '{}' is the label (default: 'a photo of {}')")
    parser.add_argument('--batch-size', type=_positive, default=8)
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cuda:0 (default cpu)')
    parser.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default='float32',
                        help='detector weights (bfloat16 / float16 halve GPU time and memory)')
    parser.add_argument('--workers', type=int, default=2,
                        help='processes that read and preprocess images (OWLv2 preprocessing '
                             'takes ~0.7 s per image on a CPU core: use more on a GPU machine; '
                             'default 2, 0 = in the main process)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def find_images(folder: str):
    """Image paths under ``folder``, relative with forward slashes, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
    return sorted(found)


def load_rgb(folder: str, key: str):
    from mllm.datasets.annotate import AnnotateError
    from mllm.datasets.image_processing import ImageError, open_rgb

    path = os.path.join(folder, key)
    try:
        return open_rgb(path)  # as the training loader reads it (no EXIF rotation)
    except (ImageError, OSError) as err:
        raise AnnotateError(f'{path}: cannot read image ({err})') from None


class ImageInputs:
    """(key, model input, (width, height)) per image, or (key, None, error message): a bad
    image is reported by the main process, naming the file."""

    def __init__(self, folder, keys, image_processor):
        self.folder, self.keys, self.image_processor = folder, keys, image_processor

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        from mllm.datasets.annotate import AnnotateError, preprocess

        key = self.keys[index]
        try:
            image = load_rgb(self.folder, key)
        except AnnotateError as err:
            return key, None, str(err)
        return key, preprocess(self.image_processor, image), image.size


def _as_list(batch):
    return batch


def resume_entries(partial: str, settings: dict) -> dict:
    """Entries already in ``partial``, whose first line must hold the same settings; none
    if it does not exist. A cut last line (the run was killed mid-write) is removed."""
    from mllm.datasets.annotate import AnnotateError
    from mllm.datasets.boxes import entry_error

    if not os.path.exists(partial):
        return {}
    with open(partial, 'rb') as f:
        data = f.read()
    complete = data[:data.rfind(b'\n') + 1]
    if len(complete) < len(data):
        with open(partial, 'r+b') as f:
            f.truncate(len(complete))
    if not complete:  # killed before the settings line was written
        os.remove(partial)
        return {}
    try:
        records = [json.loads(line) for line in complete.decode('utf-8').splitlines()]
    except ValueError as err:
        raise AnnotateError(f'{partial}: unreadable ({err}); delete it to start over') from None
    saved = records[0].get('settings') if isinstance(records[0], dict) else None
    if saved != settings:
        changed = sorted(k for k in settings if (saved or {}).get(k) != settings[k])
        raise AnnotateError(f'{partial} was made with other settings ({", ".join(changed)}); '
                            f'delete it to start over')
    entries = {}
    for number, record in enumerate(records[1:], 2):
        key = record.pop('image', None) if isinstance(record, dict) else None
        if not isinstance(key, str) or entry_error(record):
            raise AnnotateError(f'{partial}: line {number} is not an annotated image; delete '
                                f'it to start over')
        entries[key] = record
    return entries


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from mllm.datasets.annotate import AnnotateError, BoxAnnotator, read_labels
    from mllm.datasets.boxes import write_box_file

    start = time.time()
    try:
        if not os.path.isdir(args.images):
            raise AnnotateError(f'{args.images}: image folder not found')
        keys = find_images(args.images)
        if not keys:
            raise AnnotateError(f'{args.images}: no images ({", ".join(IMAGE_EXTENSIONS)})')
        labels = read_labels(args.labels, args.labels_file)
        settings = dict(detector=os.path.abspath(args.detector), labels=labels,
                        threshold=args.threshold, nms_iou=args.nms_iou, prompt=args.prompt,
                        max_per_label=args.max_per_label, cap_above=args.cap_above)
        partial = args.out + '.partial'
        entries = {k: v for k, v in resume_entries(partial, settings).items() if k in keys}
        todo = [k for k in keys if k not in entries]
        if entries:
            print(f'resuming from {partial}: {len(entries)} of {len(keys)} images done')
        annotator = BoxAnnotator(args.detector, labels, threshold=args.threshold,
                                 nms_iou=args.nms_iou, max_per_label=args.max_per_label,
                                 cap_above=args.cap_above, prompt=args.prompt,
                                 device=args.device, dtype=getattr(torch, args.dtype))
        resumed = os.path.exists(partial)
        with open(partial, 'a', encoding='utf-8') as log, \
                tqdm(total=len(todo), unit='img', desc='annotate-boxes', dynamic_ncols=True,
                     disable=args.no_progress) as bar:
            if not resumed:
                log.write(json.dumps(dict(settings=settings)) + '\n')
            inputs = ImageInputs(args.images, todo, annotator.processor.image_processor)
            loader = DataLoader(inputs, batch_size=args.batch_size, collate_fn=_as_list,
                                num_workers=max(args.workers, 0))
            for batch in loader:
                good = [item for item in batch if item[1] is not None]
                if good:
                    found = annotator.detect(torch.stack([item[1] for item in good]),
                                             [item[2] for item in good])
                    for (key, _, _), entry in zip(good, found):
                        entries[key] = entry
                        log.write(json.dumps(dict(image=key, **entry)) + '\n')
                    log.flush()  # a crash loses at most the batch in flight
                for _, pixel_values, message in batch:
                    if pixel_values is None:  # after saving the rest of its batch
                        raise AnnotateError(message)
                bar.update(len(batch))
        write_box_file(args.out, {k: entries[k] for k in keys})
    except AnnotateError as err:
        print(f'mllm annotate-boxes: error: {err}', file=sys.stderr)
        return 1
    if os.path.exists(partial):
        os.remove(partial)
    num_boxes = sum(len(entries[k]['boxes']) for k in keys)
    empty = sum(not entries[k]['boxes'] for k in keys)
    print(f'{len(keys)} images, {num_boxes} boxes, {empty} images with no box -> {args.out} '
          f'({annotator.model_type}, {len(labels)} labels, {time.time() - start:.1f} s)')
    return 0
