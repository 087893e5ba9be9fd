"""The LLaVA JSON data format: samples with an optional image and human/gpt turns.

A data file is a JSON list (``.json``) or one sample per line (``.jsonl``)::

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}]}

Structure is validated when the dataset is built (every problem is reported with the
file, the line or index and the sample id); images are read when a sample is used.
"""
import json
import logging
import os
from typing import List, Optional, Tuple

import torch
from mmengine.logging import print_log
from PIL import Image
from torch.utils.data import Dataset

from mllm.datasets.image_processing import MAX_IMAGE_PIXELS, ImageError, open_rgb
from mllm.datasets.templates import IMAGE_TOKEN, encode_conversation, get_template
from mllm.registry import DATASETS, TRANSFORMS

ROLES = {'human', 'gpt', 'user', 'assistant', 'system'}


class DataError(ValueError):
    """A problem with one sample of a data file; the message names the file and sample."""


def sample_id(sample):
    """The sample's ``id``; None when it has none or is not an object."""
    return sample.get('id') if isinstance(sample, dict) else None


def sample_place(place: str, sample) -> str:
    """``place`` with the sample's id when it has one: "line 7 (id 000007)"."""
    sid = str(sample_id(sample) or '')
    # bytes that were not UTF-8 show as \xNN (see read_samples), not as lone surrogates
    sid = sid.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    return f'{place} (id {sid})' if sid else place


def _is_utf8(sample) -> bool:
    try:
        json.dumps(sample, ensure_ascii=False).encode('utf-8')  # lone surrogates fail here
    except UnicodeEncodeError:
        return False
    return True


def read_samples(data_path: str) -> Tuple[List[dict], List[str]]:
    """Samples of a .json/.jsonl file and, per sample, where it is ("line 7" / "index 6").
    ``DataError`` names the line of invalid JSON, or every sample holding bytes that are
    not UTF-8 (with its line or index and id)."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f'data file not found: {data_path}')
    # Bytes that are not UTF-8 are decoded to lone surrogates ('surrogateescape') and the
    # samples holding them are named below, instead of a UnicodeDecodeError naming nothing.
    undecodable = []  # indices of samples holding such bytes
    with open(data_path, 'rb') as f:
        if data_path.endswith('.jsonl'):
            samples, places = [], []
            for lineno, line in enumerate(f, 1):
                try:
                    line, utf8 = line.decode('utf-8'), True
                except UnicodeDecodeError:
                    line, utf8 = line.decode('utf-8', 'surrogateescape'), False
                if not line.strip():
                    continue
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f'{data_path}: line {lineno}: invalid JSON ({err.msg})') from err
                places.append(f'line {lineno}')
                if not utf8:
                    undecodable.append(len(samples) - 1)
        else:
            raw, utf8 = f.read(), True
            try:
                text = raw.decode('utf-8')
            except UnicodeDecodeError:
                text, utf8 = raw.decode('utf-8', 'surrogateescape'), False
            try:
                samples = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f'{data_path}: line {err.lineno}: invalid JSON '
                                f'({err.msg})') from err
            if not isinstance(samples, list):
                raise DataError(f'{data_path}: expected a JSON list of samples, '
                                f'got {type(samples).__name__}')
            places = [f'index {i}' for i in range(len(samples))]
            if not utf8:  # parsed, so the bytes are inside strings: find their samples
                undecodable = [i for i, sample in enumerate(samples) if not _is_utf8(sample)]
    if undecodable:
        listing = '; '.join(sample_place(places[i], samples[i]) for i in undecodable[:5])
        raise DataError(f'{data_path}: {len(undecodable)} sample(s) hold bytes that are not '
                        f'UTF-8 — {listing}{" ..." if len(undecodable) > 5 else ""} '
                        '(save the file as UTF-8)')
    return samples, places


def sample_problem(sample) -> Optional[str]:
    """What is structurally wrong with one sample, or None."""
    if not isinstance(sample, dict):
        return f'a sample must be an object, got {type(sample).__name__}'
    conversations = sample.get('conversations')
    if not isinstance(conversations, list) or not conversations:
        return "missing or empty 'conversations' list"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get('value'), str):
            return f"turn {i} must be an object with a string 'value'"
        if turn.get('from') not in ROLES:
            return f"turn {i} has unknown role {turn.get('from')!r} (expected human or gpt)"
    image = sample.get('image')
    # templates expand <image> in human turns only; in an answer it is plain text
    num_placeholders = sum(t['value'].count(IMAGE_TOKEN) for t in conversations
                           if t['from'] in ('human', 'user'))
    if image is not None and not isinstance(image, str):
        return f"'image' must be a path string, got {type(image).__name__}"
    if image and num_placeholders != 1:
        return (f'the sample has an image but {num_placeholders} {IMAGE_TOKEN} placeholders '
                'in its text (expected exactly 1)')
    if not image and num_placeholders:
        return f'the text has {IMAGE_TOKEN} but the sample has no image'
    return None


def resolve_image_path(image_folder: Optional[str], image: str) -> str:
    """The image's path; relative paths may not escape ``image_folder`` with ``..`` or an
    absolute path. Symlinks inside the folder are followed (datasets are often linked in)."""
    if image_folder is None:
        return image
    root = os.path.abspath(image_folder)
    path = os.path.abspath(os.path.join(root, image))
    if os.path.commonpath([root, path]) != root:
        raise DataError(f'image path {image!r} points outside the image folder {image_folder}')
    return path


def expand_image_placeholder(conversations: List[dict], image_processor, image_size) -> List[dict]:
    """Replace ``<image>`` with the processor's layout when it makes several image tensors
    (UHD slices: ``<image>,<image>\n...<image>``); the conversation is not modified."""
    placeholder = getattr(image_processor, 'placeholder', None)
    if placeholder is None:
        return conversations
    layout = placeholder(image_size)
    return [dict(turn, value=turn['value'].replace(IMAGE_TOKEN, layout))
            if turn['from'] in ('human', 'user') else turn for turn in conversations]


def select_boxes(entry: dict, image_size, image_processor, max_boxes: int) -> torch.Tensor:
    """The object boxes one image contributes (training and chat alike): a box-file entry's
    boxes clipped to the image of ``image_size`` = (W, H), degenerate ones dropped, at most
    ``max_boxes`` (best scores first), mapped to pixels of the processor's output tensor."""
    from mllm.datasets.boxes import clip_boxes

    boxes = clip_boxes(torch.tensor(entry['boxes'], dtype=torch.float32).reshape(-1, 4),
                       *image_size)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = torch.arange(len(boxes))
    if entry.get('scores') is not None:
        order = torch.argsort(torch.tensor(entry['scores']), descending=True, stable=True)
    order = order[valid[order]][:max_boxes]
    return image_processor.map_boxes(boxes[order], image_size)


def image_inputs(image, image_processor, box_entry: Optional[dict] = None,
                 max_boxes: int = 100) -> Tuple[torch.Tensor, int, Optional[torch.Tensor]]:
    """One image as the model takes it, for training and chat alike: ``(pixel_values,
    number of image-token slots, boxes)``; with a box-file entry each kept box adds one
    slot after the grid tokens, else ``boxes`` is None."""
    pixel_values = image_processor(image)
    num_tokens = image_processor.num_visual_tokens(image.size)
    boxes = None
    if box_entry is not None:
        boxes = select_boxes(box_entry, image.size, image_processor, max_boxes)
        num_tokens += len(boxes)
    return pixel_values, num_tokens, boxes


@DATASETS.register_module()
class LLaVADataset(Dataset):
    """LLaVA JSON/JSONL conversations with images, encoded as training sees them.

    Args:
        data_path: the .json or .jsonl file.
        image_folder: folder that sample ``image`` paths are relative to.
        tokenizer: tokenizer or its config (``dict(pretrained=...)``); recipes bind the
            top-level ``tokenizer`` key.
        template: chat template name; recipes bind the top-level ``template`` key.
        image_processor: processor config or instance; recipes bind ``image_processor``.
        max_length: longest token sequence; longer samples are truncated. Defaults to 2048.
        blank_images: replace every image with a blank one (the "blind" baseline).
        strict: raise on malformed samples when built; ``mllm check-data`` turns it off
            to list every problem (``self.problems``) instead of stopping at the first.
        bad_sample_policy: what a sample that fails when read (missing or undecodable
            image, failed encoding) does: 'error' stops training with a ``DataError``
            naming it; 'skip' logs the reason, counts it and returns the next readable
            sample instead. Defaults to 'error'.
        max_skipped_ratio: under 'skip', stop once more than this share of the dataset
            was found bad (counted per data-loader worker). Defaults to 0.01.
        box_file: object boxes per image (MG-LLaVA object tokens; format in
            ``mllm.datasets.boxes``). Each image then reserves one more image-token slot
            per box and the sample carries ``boxes`` (xyxy pixels of the image tensor).
            An image without an entry in the file is a bad sample. Defaults to None.
        max_boxes: most boxes per image, the best-scoring first. Defaults to 100.
        token_cache: folder for the offline tokenisation cache
            (``mllm.datasets.token_cache``): the data file is tokenised once, into a
            subfolder keyed by the data file, tokenizer and template, and later runs read
            it back. Not used with processors that lay out several image tensors per image
            (UHD slices). Defaults to None (tokenise on the fly).
        max_image_pixels: an image of more pixels (width x height, read from its header
            before it is decoded) is a bad sample, a guard against decompression bombs
            (tiny files that decode to gigabytes). PIL's own check still applies above it
            (an error over twice ``PIL.Image.MAX_IMAGE_PIXELS``), reported the same way.
            Defaults to 89_478_485 (PIL's default limit, about 9459 x 9459).
    """

    def __init__(self, data_path: str, tokenizer, template: str, image_processor,
                 image_folder: Optional[str] = None, max_length: int = 2048,
                 blank_images: bool = False, strict: bool = True,
                 bad_sample_policy: str = 'error', max_skipped_ratio: float = 0.01,
                 box_file: Optional[str] = None, max_boxes: int = 100,
                 token_cache: Optional[str] = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        from mllm.datasets.tokenizers import build_tokenizer

        self.data_path = data_path
        self.image_folder = image_folder
        self.tokenizer = build_tokenizer(tokenizer)
        self.template = get_template(template)
        self.image_processor = (TRANSFORMS.build(image_processor)
                                if isinstance(image_processor, dict) else image_processor)
        self.max_length = max_length
        self.blank_images = blank_images
        self.max_image_pixels = max_image_pixels
        if bad_sample_policy not in ('error', 'skip'):
            raise ValueError(f"bad_sample_policy must be 'error' or 'skip', got {bad_sample_policy!r}")
        self.bad_sample_policy = bad_sample_policy
        self.max_skipped_ratio = max_skipped_ratio
        self.skipped = set()  # indices found bad at run time (this process only)
        self.box_file, self.max_boxes = box_file, max_boxes
        self.box_entries = None
        if box_file is not None:
            from mllm.datasets.boxes import load_box_file
            if not hasattr(self.image_processor, 'map_boxes'):
                raise ValueError(f'{type(self.image_processor).__name__} cannot map boxes; '
                                 'box_file needs an image processor with map_boxes()')
            self.box_entries = load_box_file(box_file)
        self.samples, self.places = read_samples(data_path)
        if not self.samples:  # else training fails later, in the sampler, naming nothing
            raise DataError(f'{data_path}: the file holds no samples; a dataset needs at least one')
        self.problems = [(i, p) for i, s in enumerate(self.samples)
                         if (p := sample_problem(s)) is not None]
        if self.problems and strict:
            problems = [(self.places[i], p) for i, p in self.problems]
            listing = '; '.join(f'{place}: {p}' for place, p in problems[:5])
            raise DataError(f'{data_path}: {len(problems)} malformed sample(s) — {listing}'
                            f'{" ..." if len(problems) > 5 else ""} (run `mllm check-data`)')
        self.token_cache = None if token_cache is None else self._open_token_cache(token_cache)

    def _open_token_cache(self, cache_dir: str):
        """The tokenisation cache of this data file, tokenizer and template under
        ``cache_dir``, built first when there is none."""
        import time

        from mllm.datasets.token_cache import TokenCache, build_cache, cache_key

        if getattr(self.image_processor, 'placeholder', None) is not None:
            print_log(f'{type(self.image_processor).__name__} lays out several image tensors '
                      'per image: token_cache is not used, samples are tokenised on the fly',
                      logger='current', level=logging.WARNING)
            return None
        folder = os.path.join(cache_dir, cache_key(self.data_path, self.tokenizer, self.template))
        if not os.path.isdir(folder):
            start = time.perf_counter()
            build_cache(folder, len(self), self._encode_text)
            print_log(f'tokenised {len(self)} samples of {self.data_path} into {folder} in '
                      f'{time.perf_counter() - start:.1f} s', logger='current')
        cache = TokenCache(folder)
        if len(cache) != len(self):
            raise DataError(f'{folder}: token cache holds {len(cache)} samples, '
                            f'{self.data_path} has {len(self)}; delete the folder')
        return cache

    def _encode_text(self, index: int):
        """(ids, labels) of sample ``index`` with one image sentinel for its image, for the
        token cache; ``ValueError`` when it cannot be encoded."""
        sample = self.samples[index]
        problem = sample_problem(sample)
        if problem is not None:
            raise ValueError(problem)
        encoded = encode_conversation(sample['conversations'], self.tokenizer, self.template,
                                      num_image_tokens=1 if sample.get('image') else 0)
        return encoded['input_ids'], encoded['labels']

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return f'{self.data_path}: {sample_place(self.places[index], self.samples[index])}'

    @property
    def modality_length(self) -> List[int]:
        """Cheap length estimates, negative for text-only samples (LLaVA's convention)."""
        lengths = []
        for s in self.samples:
            if not isinstance(s, dict) or not isinstance(s.get('conversations'), list):
                lengths.append(-1)  # malformed (strict=False); never trained on
                continue
            words = sum(len(str(t.get('value', '')).split()) for t in s['conversations']
                        if isinstance(t, dict))
            if s.get('image'):
                # an int (one view) or a list of positions per view (UHD's slice layouts)
                tokens = self.image_processor.num_visual_tokens((1, 1))
                lengths.append(words + (sum(tokens) if isinstance(tokens, list) else tokens))
            else:
                lengths.append(-max(words, 1))
        return lengths

    def load_image(self, index: int) -> Image.Image:
        try:
            path = resolve_image_path(self.image_folder, self.samples[index]['image'])
        except DataError as err:  # name the sample, as every other data error does
            raise DataError(f'{self.describe(index)}: {err}') from None
        try:  # 16-bit images scaled to 8 bits, decompression bombs refused: see open_rgb
            return open_rgb(path, max_pixels=self.max_image_pixels)
        except FileNotFoundError as err:
            raise DataError(f'{self.describe(index)}: image not found: {path}') from err
        except ImageError as err:
            raise DataError(f'{self.describe(index)}: {err}') from err

    def box_entry(self, index: int) -> dict:
        """The box-file entry of sample ``index``'s image; ``DataError`` when it has none."""
        key = self.samples[index]['image']
        entry = self.box_entries.get(key)
        if entry is None:
            entry = self.box_entries.get(os.path.normpath(key).replace(os.sep, '/'))
        if entry is None:
            raise DataError(f'{self.describe(index)}: image {key!r} has no entry in the box file '
                            f'{self.box_file} (annotate it with `mllm annotate-boxes`)')
        return entry

    def image_boxes(self, index: int, image_size) -> torch.Tensor:
        """The boxes of sample ``index``'s image, clipped to it, degenerate ones dropped, at
        most ``max_boxes`` (best scores first), mapped to pixels of the image tensor."""
        return select_boxes(self.box_entry(index), image_size, self.image_processor,
                            self.max_boxes)

    def __getitem__(self, index: int) -> dict:
        if self.bad_sample_policy == 'error':
            return self.encode(index)
        for offset in range(len(self)):
            substitute = (index + offset) % len(self)  # deterministic: the next sample
            if substitute in self.skipped:
                continue
            try:
                return self.encode(substitute)
            except DataError as err:
                self._skip(substitute, err)
        raise DataError(f'{self.data_path}: no readable sample left')

    def _skip(self, index: int, err: DataError) -> None:
        self.skipped.add(index)
        limit = self.max_skipped_ratio * len(self)
        print_log(f'skipped a bad sample ({len(self.skipped)} so far, stop above {limit:g}): '
                  f'{err}', logger='current', level=logging.WARNING)
        if len(self.skipped) > limit:
            raise DataError(f'{len(self.skipped)} of {len(self)} samples were bad, more than '
                            f'max_skipped_ratio={self.max_skipped_ratio:g} allows; last: {err}')

    def encode(self, index: int) -> dict:
        """Sample ``index`` as training sees it; raises ``DataError`` naming it."""
        sample = self.samples[index]
        conversations, num_image_tokens, pixel_values = sample['conversations'], 0, None
        boxes = None
        if sample.get('image'):
            image = self.image_processor.blank() if self.blank_images else self.load_image(index)
            box_entry = None
            if self.box_entries is not None:
                # a blank image has no objects: the blind baseline sees no boxes either
                box_entry = dict(boxes=[]) if self.blank_images else self.box_entry(index)
            pixel_values, num_image_tokens, boxes = image_inputs(
                image, self.image_processor, box_entry, self.max_boxes)
            conversations = expand_image_placeholder(conversations, self.image_processor, image.size)
        try:
            if self.token_cache is not None:
                input_ids, labels = self.token_cache.get(index, num_image_tokens,
                                                         self.max_length)
            else:
                encoded = encode_conversation(conversations, self.tokenizer, self.template,
                                              num_image_tokens=num_image_tokens,
                                              max_length=self.max_length)
                input_ids = torch.tensor(encoded['input_ids'])
                labels = torch.tensor(encoded['labels'])
        except ValueError as err:
            raise DataError(f'{self.describe(index)}: {err}') from err
        item = dict(input_ids=input_ids, labels=labels, pixel_values=pixel_values, index=index)
        if self.box_entries is not None:
            item['boxes'] = boxes
        return item
