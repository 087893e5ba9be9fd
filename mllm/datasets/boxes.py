"""Box files: per-image object boxes for MG-LLaVA's object tokens (format in data/README.md).

A box file is one JSON object keyed by image path (relative to the image folder, forward
slashes), each entry ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [...], "scores": [...]}``
in float pixels of the original image. ``scores`` is optional for readers. An image with an
entry and empty lists has no object; an image without an entry was never annotated.

NMS and the per-label cap follow MG-LLaVA's ``bbox_nms`` and ``limit_mode='per_category'``:
NMS per label (``batched_nms`` with the label as category) at IoU 0.2, then, only when more
than 100 boxes remain, the 20 best-scoring boxes of each label.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch


class BoxFileError(ValueError):
    """A malformed box file; the message names the file and, where it applies, the image key."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def entry_error(entry) -> Optional[str]:
    """What is wrong with one entry's structure, or None when it is well formed."""
    if not isinstance(entry, dict):
        return f'must be an object with "boxes" and "labels", got {type(entry).__name__}'
    for field in ('boxes', 'labels'):
        if field not in entry:
            return f'missing "{field}"'
    for field in ('boxes', 'labels', 'scores'):
        if field in entry and not isinstance(entry[field], list):
            return f'"{field}" must be a list, got {type(entry[field]).__name__}'
    boxes, labels = entry['boxes'], entry['labels']
    lengths = {'boxes': len(boxes), 'labels': len(labels)}
    if 'scores' in entry:
        lengths['scores'] = len(entry['scores'])
    if len(set(lengths.values())) > 1:
        return 'lengths differ: ' + ', '.join(f'{k} {v}' for k, v in lengths.items())
    for i, box in enumerate(boxes):
        if not isinstance(box, list) or len(box) != 4:
            return f'box {i} must be a list of 4 numbers [x1, y1, x2, y2], got {box!r}'
        if not all(_is_number(v) for v in box):
            return f'box {i} has a non-numeric coordinate: {box!r}'
        if not all(math.isfinite(v) for v in box):
            return f'box {i} has a non-finite coordinate: {box!r}'
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            return f'label {i} must be a string, got {label!r}'
    for i, score in enumerate(entry.get('scores', ())):
        if not _is_number(score) or not math.isfinite(score):
            return f'score {i} must be a finite number, got {score!r}'
    return None


def _no_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise BoxFileError(f'duplicate key {key!r}')
        result[key] = value
    return result


def read_box_json(path: str):
    """A box file's parsed JSON (duplicate keys refused), with errors naming the file."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise BoxFileError(f'{path}: box file not found') from None
    except BoxFileError as err:
        raise BoxFileError(f'{path}: {err}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BoxFileError(f'{path}: not valid JSON ({err})') from None


def box_entries(data, path: str) -> Dict[str, dict]:
    """Validated, normalised entries of a box file's parsed JSON (see ``load_box_file``)."""
    if not isinstance(data, dict):
        raise BoxFileError(f'{path}: must be a JSON object keyed by image path, '
                           f'got a {type(data).__name__}')
    entries = {}
    for key, entry in data.items():
        if not key:
            raise BoxFileError(f'{path}: empty image key')
        error = entry_error(entry)
        if error:
            raise BoxFileError(f'{path}: {key!r}: {error}')
        scores = entry.get('scores')
        entries[key] = dict(boxes=[[float(v) for v in box] for box in entry['boxes']],
                            labels=list(entry['labels']),
                            scores=None if scores is None else [float(s) for s in scores])
    return entries


def load_box_file(path: str) -> Dict[str, dict]:
    """Read and validate a box file.

    Returns ``{image_path: {'boxes': [[x1, y1, x2, y2] floats], 'labels': [str],
    'scores': [float] or None}}``. Raises ``BoxFileError`` naming the file and key for
    malformed content: not JSON, not an object, duplicate keys, wrong types, lengths of
    boxes/labels/scores that differ, boxes without 4 numbers, non-finite numbers.
    Geometry (degenerate or out-of-image boxes) is ``box_problems``'s business.
    """
    return box_entries(read_box_json(path), path)


def write_box_file(path: str, entries: Dict[str, dict]) -> None:
    """Write ``entries`` atomically: a temporary file in the same folder, then ``os.replace``,
    so a reader never sees half a file. Entries are validated first."""
    for key, entry in entries.items():
        error = entry_error(entry)
        if error:
            raise BoxFileError(f'{path}: refusing to write {key!r}: {error}')
    write_json_atomic(path, entries)


def write_json_atomic(path: str, obj) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, ensure_ascii=False, separators=(',', ':'))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clip_boxes(boxes, width: float, height: float):
    """Clamp xyxy boxes to ``[0, width] x [0, height]``; a tensor (N, 4) in, a tensor out,
    lists in, lists out."""
    tensor = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    clipped = torch.stack([tensor[:, 0].clamp(0, width), tensor[:, 1].clamp(0, height),
                           tensor[:, 2].clamp(0, width), tensor[:, 3].clamp(0, height)], dim=1)
    if isinstance(boxes, torch.Tensor):
        return clipped.to(boxes.dtype if boxes.is_floating_point() else torch.float32)
    return clipped.tolist()


def box_problems(entry: dict, width: int, height: int) -> List[str]:
    """Problems of one entry against its image size, one message per box: boxes reaching
    outside the image (readers clip them) and boxes of zero or negative area after clipping
    (readers cannot use them). A malformed entry gives one message and nothing else."""
    error = entry_error(entry)
    if error:
        return [error]
    problems = []
    for i, (box, label) in enumerate(zip(entry['boxes'], entry['labels'])):
        where = f'box {i} {box} ({label!r})'
        x1, y1, x2, y2 = clip_boxes([box], width, height)[0]
        if x2 <= x1 or y2 <= y1:
            problems.append(f'{where} is degenerate: zero or negative area '
                            f'inside the {width}x{height} image')
        elif (min(box[0], box[2]) < 0 or min(box[1], box[3]) < 0 or
              max(box[0], box[2]) > width or max(box[1], box[3]) > height):
            problems.append(f'{where} extends outside the {width}x{height} image '
                            f'(it is clipped when loaded)')
    return problems


def nms_per_label(boxes: torch.Tensor, scores: torch.Tensor, labels: Sequence[str],
                  iou_threshold: float = 0.2) -> torch.Tensor:
    """Indices kept by NMS run separately per label (boxes of different labels never
    suppress each other), best score first. A box is suppressed when its IoU with a
    better box of the same label is greater than ``iou_threshold``."""
    from torchvision.ops import batched_nms

    if len(labels) == 0:
        return torch.zeros(0, dtype=torch.long)
    label_ids = {}
    idxs = torch.tensor([label_ids.setdefault(label, len(label_ids)) for label in labels])
    return batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


def cap_per_label(scores: torch.Tensor, labels: Sequence[str], max_per_label: int = 20,
                  cap_above: int = 100) -> torch.Tensor:
    """Indices kept, best score first: all of them when there are at most ``cap_above``
    boxes, otherwise the ``max_per_label`` best-scoring boxes of each label."""
    order = torch.argsort(scores, descending=True, stable=True)
    if len(order) <= cap_above:
        return order
    seen: Dict[str, int] = {}
    keep = []
    for i in order.tolist():
        seen[labels[i]] = seen.get(labels[i], 0) + 1
        if seen[labels[i]] <= max_per_label:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def filter_boxes(boxes: torch.Tensor, scores: torch.Tensor, labels: Sequence[str],
                 iou_threshold: float = 0.2, max_per_label: int = 20,
                 cap_above: int = 100) -> torch.Tensor:
    """MG-LLaVA's reduction: ``nms_per_label`` then ``cap_per_label``; indices into the
    inputs, best score first."""
    keep = nms_per_label(boxes, scores, labels, iou_threshold)
    capped = cap_per_label(scores[keep], [labels[i] for i in keep.tolist()],
                           max_per_label, cap_above)
    return keep[capped]
