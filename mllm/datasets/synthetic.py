"""Seeded synthetic visual-QA set in the LLaVA JSON format, plus a word-level tokenizer.

The set exists to show that a tiny random-init LLaVA (64 px ViT, 2-layer LLM) learns to *use the image*
on a CPU in minutes. Every question is answerable only from the image: inside a category the question
wording is drawn independently of the answer and the answers are exactly balanced, so a blind model
(blank images) sits at chance, 1/k per category.

Categories (answers are one word each):
    colour       What colour is the shape?            red green blue yellow purple orange   (1/6)
    shape        What shape is shown?                 circle square triangle cross          (1/4)
    position     Where is the shape?                  left right top bottom                 (1/4)
    count        How many shapes are there?           one two three four                    (1/4)
    fine_detail  What pattern is in the small box?    rows columns checks plain            (1/4)

fine_detail is legible at full resolution, not at 64 px, whatever filter does the downsampling. A framed
square patch (8x8 cells of 64 px, 32x32 px at 256 px: one stride-32 token's worth) sits at a random
64-px-grid-aligned spot near a random corner. It is filled with mid grey g plus a zero-mean 1-px-period pattern: horizontal stripes ('rows'),
vertical stripes ('columns'), a checkerboard ('checks') or nothing ('plain'). Along a striped axis the
offset follows the profile p(j) = (-1)**j * (1, 3, 3, 1)[j % 4] (rows: 3 k p(y), columns: 3 k p(x), checks:
k p(x) p(y), k = PATTERN_STEP grey levels, so all reach +-9k), i.e. every 4-px run is +1 -3 +3 -1: a third
finite difference, with zero mean, zero first and second moment, and antisymmetric about the centre of its
64-px cell. Hence:

* box / area (``Image.reduce``, ``Image.BOX``, torch ``mode='area'``) give byte-identical 64-px images for
  every answer, and so does torch antialiased bilinear; the float responses of PIL / torch bilinear
  (piecewise linear kernel) are exactly equal too;
* any other symmetric kernel sees only a third-order residue (float, at PATTERN_STEP = 7: bicubic 0.13,
  lanczos 0.15, hamming 0.77 grey levels). Measured on uint8 output over 200 scenes x 4 answers, the 64-px
  images differ by at most 1/255 for PIL bicubic (what ``LLaVAImageProcessor`` uses), bilinear and lanczos
  and torch antialiased bicubic, and by at most 2/255 for PIL hamming (kernel with a kink at its edge).
  These +-1 rounding flips are not random, though: a probe given the patch location reads the answer from
  the bicubic 64-px pixels around it well above chance (~0.7 vs 0.25), so a "cannot see it at 64 px"
  claim holds for what a model can plausibly learn, not information-theoretically.

A plain alternating stripe (+1 -1 +1 -1) is NOT enough: its cut-off ends leak ~7% of its contrast through
bicubic / lanczos. The price of the design is that the 2x2 means are not constant (pairs +1 -3 | +3 -1),
so the answer is still visible at 128 px; it is removed only at factor >= 4, i.e. at 64 px from 256 px.
"""
import json
import os
import os.path as osp
import random
import re
import shutil
import string

from PIL import Image, ImageDraw

CATEGORIES = ('colour', 'shape', 'position', 'count', 'fine_detail')
# share of each split per category. fine_detail had 0.12 up to FORMAT_VERSION 3: too few samples for the
# high-resolution tiny models to learn to find and read the patch in 600 steps (still at chance on train)
CATEGORY_SHARES = (0.2, 0.2, 0.2, 0.2, 0.2)

COLOURS = {
    'red': (220, 30, 30), 'green': (20, 160, 50), 'blue': (30, 70, 230),
    'yellow': (240, 205, 0), 'purple': (140, 40, 180), 'orange': (250, 125, 0),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')
POSITIONS = ('left', 'right', 'top', 'bottom')
COUNTS = ('one', 'two', 'three', 'four')
PATTERNS = ('rows', 'columns', 'checks', 'plain')  # fine_detail: what fills the framed patch
CORNERS = ('top_left', 'top_right', 'bottom_left', 'bottom_right')
PATTERN_PROFILE = (1, -3, 3, -1)  # one 4-px run of the stripe profile: a third finite difference
PATTERN_STEP = 7  # grey levels per profile unit: stripes reach +-63, checks +-63 at their strongest
# patch side in 64-px cells (32 px at 256 px). At 4 cells (16 px, FORMAT_VERSION <= 3) the pattern sat in a
# quarter of one stride-32 token, and a tiny ConvNeXt + attention read-out did not find it in 300 steps
PATCH_CELLS = 8

ANSWERS = dict(colour=tuple(COLOURS), shape=SHAPES, position=POSITIONS, count=COUNTS,
               fine_detail=PATTERNS)
QUESTIONS = dict(
    colour=('What colour is the shape?', 'What is the colour of the shape?'),
    shape=('What shape is shown?', 'Which shape is in the image?'),
    position=('Where is the shape?', 'On which side of the image is the shape?'),
    count=('How many shapes are there?', 'How many shapes are in the image?'),
    fine_detail=('What pattern is in the small box?', 'Which pattern fills the marked box?'),
)
# vicuna_v1 template words, so a chat-formatted prompt never hits <unk>
CHAT_TEXTS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.", 'USER: ASSISTANT:')
SPECIAL_TOKENS = ('<unk>', '<s>', '</s>', '<pad>', '<image>')  # ids 0..4, Llama order for the first three
VOCAB_LIMIT = 256  # vocab_size of the tiny LLM config
FORMAT_VERSION = 4  # bump when the output changes for the same arguments; invalidates meta.json caches


def _draw_shape(draw, shape, cx, cy, r, fill):
    """Draw a filled shape of radius ``r`` centred at (cx, cy)."""
    if shape == 'circle':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == 'square':
        s = 0.85 * r  # roughly the circle's area
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == 'cross':
        t = 0.35 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f'unknown shape {shape!r}, expected one of {SHAPES}')


def _stripe_profile(n):
    """Integer offsets along a striped axis: (-1)**j * (1, 3, 3, 1)[j % 4], j < n (n a multiple of 4)."""
    return [PATTERN_PROFILE[j % 4] for j in range(n)]


def _detail_patch(pattern, grey, size):
    """The fine-detail patch as rows of grey levels (a list of ``n`` lists of ``n`` ints, n = PATCH_CELLS * f).

    Every answer has the same mean over each 4x4 px block (``grey``); see the module docstring for why the
    offsets vanish at 64 px under any symmetric downsampling kernel.
    """
    n = PATCH_CELLS * (size // 64)
    p, k = _stripe_profile(n), PATTERN_STEP
    offset = dict(rows=lambda x, y: 3 * k * p[y], columns=lambda x, y: 3 * k * p[x],
                  checks=lambda x, y: k * p[x] * p[y], plain=lambda x, y: 0)[pattern]
    return [[grey + offset(x, y) for x in range(n)] for y in range(n)]


def _detail_origin(params, size):
    """Top-left pixel of the fine-detail patch: grid-aligned, ``jitter`` cells in from a corner margin."""
    f, n = size // 64, PATCH_CELLS * (size // 64)
    jx, jy = params['jitter']
    x = size // 16 + jx * f
    y = size // 16 + jy * f
    x0 = x if params['corner'].endswith('left') else size - x - n
    y0 = y if params['corner'].startswith('top') else size - y - n
    return x0, y0


def _sample_params(rng, category, answer, size):
    """Draw everything the renderer needs for one sample; ``answer`` fixes the asked attribute."""
    base = rng.randint(226, 246)
    params = dict(background=tuple(base + rng.randint(-6, 6) for _ in range(3)),
                  colour=rng.choice(tuple(COLOURS)), shape=rng.choice(SHAPES), category=category)
    if category == 'count':
        slots = rng.sample([(i, j) for i in range(4) for j in range(4)], COUNTS.index(answer) + 1)
        # one copy per cell of a 4x4 grid (cell 0.25): radius 0.075 + jitter 0.04 < 0.125, no overlap/clipping
        params['items'] = [((i + 0.5 + rng.uniform(-0.16, 0.16)) * size / 4,
                            (j + 0.5 + rng.uniform(-0.16, 0.16)) * size / 4, 0.075 * size) for i, j in slots]
        return params
    if category == 'position':
        along, across = rng.uniform(0.16, 0.26), rng.uniform(0.38, 0.62)
        cx, cy = dict(left=(along, across), right=(1 - along, across),
                      top=(across, along), bottom=(across, 1 - along))[answer]
        params['items'] = [(cx * size, cy * size, 0.13 * size)]
        return params
    params[category] = answer  # colour / shape / fine_detail's pattern
    # keep clear of the detail's corner: its frame reaches 60 px (0.234) in from the edges at 256 px,
    # a square of radius 0.2 at centre 0.42 starts at 0.42 - 0.85 * 0.2 = 0.25
    max_r = 0.2 if category == 'fine_detail' else 0.28
    params['items'] = [(rng.uniform(0.42, 0.58) * size, rng.uniform(0.42, 0.58) * size,
                        rng.uniform(0.18, max_r) * size)]
    if category == 'fine_detail':
        # nothing drawn here depends on the answer: the scene is the same for every pattern
        params.update(corner=rng.choice(CORNERS), jitter=(rng.randrange(3), rng.randrange(3)),
                      grey=rng.randint(100, 155))
    return params


def _render(params, size):
    """Render one sample's image from its parameters."""
    img = Image.new('RGB', (size, size), params['background'])
    draw = ImageDraw.Draw(img)
    for cx, cy, r in params['items']:
        _draw_shape(draw, params['shape'], cx, cy, r, COLOURS[params['colour']])
    if params['category'] == 'fine_detail':
        f, n = size // 64, PATCH_CELLS * (size // 64)
        x0, y0 = _detail_origin(params, size)
        # frame f // 2 px wide, f // 2 px clear of the patch: marks the spot, identical for every answer
        # (never 1 px wide, so nothing but the patch alternates pixel to pixel)
        h = f // 2
        draw.rectangle((x0 - f, y0 - f, x0 + n + f - 1, y0 + n + f - 1), outline=(60, 60, 60), width=h)
        patch = _detail_patch(params['fine_detail'], params['grey'], size)
        img.paste(Image.frombytes('L', (n, n), bytes(v for row in patch for v in row)).convert('RGB'),
                  (x0, y0))
    return img


def _object_boxes(params, size):
    """Ground-truth boxes of one scene (xyxy pixels, a label each): every drawn shape, and the
    framed fine-detail patch; they stand in for a detector's output (``boxes.json``)."""
    boxes = [[cx - r, cy - r, cx + r, cy + r] for cx, cy, r in params['items']]
    labels = ['shape'] * len(boxes)
    if params['category'] == 'fine_detail':
        f, n = size // 64, PATCH_CELLS * (size // 64)
        x0, y0 = _detail_origin(params, size)
        boxes.append([x0 - f, y0 - f, x0 + n + f, y0 + n + f])
        labels.append('box')
    clip = lambda v: float(min(max(v, 0), size))  # noqa: E731
    return dict(boxes=[[clip(v) for v in box] for box in boxes], labels=labels,
                scores=[1.0] * len(boxes))


def _plan_split(rng, num):
    """Balanced (category, answer, question) triples in shuffled order.

    Within a category the answers cycle, and the question variant changes once per full cycle, so
    answer counts differ by at most one and every question sees every answer equally often.
    """
    counts = [int(share * num) for share in CATEGORY_SHARES]
    for i in range(num - sum(counts)):  # rounding remainder goes to the first categories
        counts[i % len(counts)] += 1
    plan = []
    for category, n in zip(CATEGORIES, counts):
        answers, questions = ANSWERS[category], QUESTIONS[category]
        plan += [(category, answers[i % len(answers)], questions[(i // len(answers)) % len(questions)])
                 for i in range(n)]
    rng.shuffle(plan)
    return plan


def _write_split(out_dir, split, num, size, seed, boxes):
    """Render and save one split; returns the path of its JSON file. The scenes' object boxes
    are added to ``boxes`` (keyed by image path, as the box-file format says)."""
    rng = random.Random(f'mllm-synthetic-{seed}-{split}')  # own RNG: global random state untouched
    img_dir = osp.join(out_dir, 'images', split)
    os.makedirs(img_dir, exist_ok=True)
    samples = []
    for i, (category, answer, question) in enumerate(_plan_split(rng, num)):
        params = _sample_params(rng, category, answer, size)
        _render(params, size).save(osp.join(img_dir, f'{i:06d}.png'), compress_level=1)
        boxes[f'{split}/{i:06d}.png'] = _object_boxes(params, size)
        samples.append(dict(id=f'{split}_{i:06d}', image=f'{split}/{i:06d}.png', conversations=[
            {'from': 'human', 'value': f'<image>\n{question}'}, {'from': 'gpt', 'value': answer}],
            category=category))
    path = osp.join(out_dir, f'{split}.json')
    with open(path, 'w') as f:
        json.dump(samples, f, indent=1)
    return path


def build_tokenizer(words_or_texts):
    """Word-level fast tokenizer whose vocab is the words of ``words_or_texts`` plus the chat template.

    Args:
        words_or_texts: iterable of words or whole texts; texts are split like the tokenizer splits them
            (runs of word characters, runs of punctuation). The vicuna_v1 template words and the digits
            0-9 are always added.

    Returns:
        transformers.PreTrainedTokenizerFast with ``<unk>``=0, ``<s>``=1 (prepended, as Llama does),
        ``</s>``=2, ``<pad>``=3 and ``<image>``=4 as single-id special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    texts = list(words_or_texts) + list(CHAT_TEXTS) + list(string.digits)
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    assert len(vocab) < VOCAB_LIMIT, f'vocab has {len(vocab)} tokens, the tiny LLM allows {VOCAB_LIMIT}'
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(cleanup=True)  # joins words with spaces, glues "?" "," "'s" back on
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', vocab['<s>'])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>', pad_token='<pad>',
        additional_special_tokens=['<image>'], model_max_length=2048, padding_side='right')


def answer_matches(prediction, answer):
    """Normalised exact match: case, punctuation and surrounding/repeated whitespace are ignored."""
    def norm(text):
        text = re.sub(f'[{re.escape(string.punctuation)}]', ' ', text.lower())
        return ' '.join(text.split())
    return norm(prediction) == norm(answer)


def _is_complete(out_dir, meta):
    try:
        with open(osp.join(out_dir, 'meta.json')) as f:
            if json.load(f) != meta:
                return False
    except (OSError, ValueError):
        return False
    needed = ['train.json', 'val.json', 'boxes.json', osp.join('tokenizer', 'tokenizer.json')]
    needed += [osp.join('images', split, f'{meta[f"num_{split}"] - 1:06d}.png')
               for split in ('train', 'val') if meta[f'num_{split}']]
    return all(osp.exists(osp.join(out_dir, p)) for p in needed)


def generate_synthetic_vqa(out_dir, num_train=4000, num_val=500, image_size=256, seed=0, overwrite=False):
    """Write the synthetic set to ``out_dir`` (cached: returns at once if already generated alike).

    Layout: ``train.json``, ``val.json``, ``images/{train,val}/NNNNNN.png`` (image paths in the JSON are
    relative to ``images/``), ``boxes.json`` (every scene's ground-truth object boxes in the box-file
    format of ``mllm.datasets.boxes``, for MG-LLaVA's object tokens), ``tokenizer/`` (load with
    ``AutoTokenizer.from_pretrained``) and ``meta.json``
    (the arguments; written last, so its presence marks a complete set). Same arguments, same bytes.

    Args:
        out_dir: output folder, created if missing.
        num_train: training samples. Defaults to 4000.
        num_val: validation samples. Defaults to 500.
        image_size: side in px; a multiple of 256, so a 64-px cell is >= 4 px, which the fine detail
            needs to vanish at 64 px. Defaults to 256.
        seed: generation seed. Defaults to 0.
        overwrite: regenerate even if a matching set exists. Defaults to False.

    Returns:
        dict(train=, val=, image_folder=, boxes=, tokenizer=) paths.
    """
    if image_size % 256:
        raise ValueError(f'image_size must be a multiple of 256 (the fine detail needs >= 4 px per '
                         f'64-px cell), got {image_size}')
    paths = dict(train=osp.join(out_dir, 'train.json'), val=osp.join(out_dir, 'val.json'),
                 image_folder=osp.join(out_dir, 'images'), boxes=osp.join(out_dir, 'boxes.json'),
                 tokenizer=osp.join(out_dir, 'tokenizer'))
    meta = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                version=FORMAT_VERSION)
    if not overwrite and _is_complete(out_dir, meta):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    # remove only what this function writes; meta.json first so a crash leaves an incomplete set
    for name in ('meta.json', 'train.json', 'val.json', 'boxes.json'):
        if osp.exists(osp.join(out_dir, name)):
            os.remove(osp.join(out_dir, name))
    for name in (paths['image_folder'], paths['tokenizer']):
        shutil.rmtree(name, ignore_errors=True)
    boxes = {}
    _write_split(out_dir, 'train', num_train, image_size, seed, boxes)
    _write_split(out_dir, 'val', num_val, image_size, seed, boxes)
    with open(paths['boxes'], 'w') as f:
        json.dump(boxes, f)
    texts = [q for qs in QUESTIONS.values() for q in qs] + [a for ans in ANSWERS.values() for a in ans]
    build_tokenizer(texts).save_pretrained(paths['tokenizer'])
    with open(osp.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    return paths
