"""MG-LLaVA: Conv-Gate fusion, object tokens (box mapping, RoIAlign pooling, token order,
zero-box images), box data, the recipes and a tiny model trained through the real CLI."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import TINY_LLM_CONFIG
from mllm.cli import main
from mllm.datasets.image_processing import LLaVAImageProcessor
from mllm.datasets.templates import IMAGE_TOKEN_INDEX
from mllm.engine.config import CONFIG_ROOT, load_config
from mllm.models.fusion import ConvGateFusion
from mllm.models.object_tokens import multi_level_map, pool_box_features
from mllm.registry import DATASETS, MODELS

REPO = os.path.dirname(CONFIG_ROOT)
# REFERENCE.md §2 LLM sizes, as the meta build counts them
LLM_PARAMS = dict(phi3_mini=3_821_079_552, vicuna7b=6_738_415_616, vicuna13b=13_015_864_320,
                  llama3_8b=8_030_261_248, yi34b=34_388_917_248)
HIDDEN = dict(phi3_mini=3072, vicuna7b=4096, vicuna13b=5120, llama3_8b=4096, yi34b=7168)
# MG-LLaVA trains both stages with XTuner's template of the LLM (Vicuna: XTuner's `vicuna`)
TEMPLATES = dict(phi3_mini='phi3_chat', vicuna7b='vicuna', vicuna13b='vicuna',
                 llama3_8b='llama3_chat', yi34b='chatml')
TINY_CONVNEXT = dict(type='ConvNeXtEncoder', backend='timm', model_name='convnext_atto',
                     model_kwargs=dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)))


def tiny_mg_cfg(**overrides):
    """A tiny MG-LLaVA: 32-px ViT (patch 8, 4x4 grid) + 128-px ConvNeXt (stride 32, 4x4)."""
    cfg = dict(type='MGLLaVAModel',
               llm=dict(type='HFCausalLM', config=copy.deepcopy(TINY_LLM_CONFIG),
                        attn_implementation='eager'),
               vision_encoder=dict(type='CLIPVisionEncoder', select_layer=-2, config=dict(
                   hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=32, patch_size=8)),
               high_res_encoder=copy.deepcopy(TINY_CONVNEXT), box_pool_size=4,
               trainable=['projector', 'bbox_projector', 'fusion', 'llm'])
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- Conv-Gate fusion

def test_fusion_is_the_identity_on_low_at_init_and_rejects_other_grids():
    torch.manual_seed(0)
    fusion = ConvGateFusion(low_channels=16, high_channels=24)
    low, high = torch.randn(3, 16, 5, 5), torch.randn(3, 24, 5, 5)
    assert torch.equal(fusion(low, high), low)  # exactly: zero-initialised projections
    assert fusion.gate[0].in_features == 32 and fusion.gate[0].out_features == 8
    with pytest.raises(ValueError, match=r'low-resolution grid \(5, 5\).*\(10, 10\)'):
        fusion(low, torch.randn(3, 24, 10, 10))
    resizing = ConvGateFusion(16, 24, resize_high=True)
    assert resizing(low, torch.randn(3, 24, 10, 10)).shape == low.shape


def test_fusion_parameter_count_for_vit_l_and_convnext_l():
    fusion = ConvGateFusion(low_channels=1024, high_channels=1536)
    # conv 1x1 1536->1536, proj 1536->1024, dwconv 7x7 on 1024, proj 1024->1024, gate 2048-512-1
    expected = (1536 * 1536 + 1536) + (1536 * 1024 + 1024) + (49 * 1024 + 1024) + \
        (1024 * 1024 + 1024) + (2048 * 512 + 512) + (512 + 1)
    assert sum(p.numel() for p in fusion.parameters()) == expected == 6_085_121


def test_gate_gets_gradient_after_one_step():
    """At init the high branch is zero, so the gate has no gradient; one step of the
    zero-initialised projection opens the path and the gate learns from then on."""
    torch.manual_seed(0)
    fusion = ConvGateFusion(low_channels=8, high_channels=12)
    low, high, target = torch.randn(2, 8, 4, 4), torch.randn(2, 12, 4, 4), torch.randn(2, 8, 4, 4)
    optimizer = torch.optim.SGD(fusion.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        ((fusion(low, high) - target) ** 2).mean().backward()
        return [p.grad.abs().sum().item() for p in fusion.gate.parameters()]

    assert all(g == 0 for g in step())
    assert fusion.proj_high.weight.grad.abs().sum() > 0  # the path that opens
    optimizer.step()
    assert all(g > 0 for g in step())


# ---------------------------------------------------------------- object tokens

@pytest.mark.parametrize('pad_to_square,keep_aspect', [(True, False), (False, True)],
                         ids=['pad_to_square', 'keep_aspect'])
def test_boxes_map_through_padding_and_resize_like_the_pixels(pad_to_square, keep_aspect):
    """Draw a red box into a non-square image: the mapped box frames the red pixels of the
    processed tensor."""
    processor = LLaVAImageProcessor(size=64, token_stride=8, pad_to_square=pad_to_square,
                                    keep_aspect=keep_aspect)
    image = Image.new('RGB', (200, 100), (255, 255, 255))
    box = [40, 20, 120, 80]
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    pixels = processor(image)
    red = (pixels[0] > 1.0) & (pixels[1] < 0)  # red channel high, green low after normalising
    ys, xs = torch.nonzero(red, as_tuple=True)
    mapped = processor.map_boxes(torch.tensor([box]), image.size)[0]
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.allclose(mapped, found, atol=1.0), (mapped, found)
    if pad_to_square:  # side 200, the image pasted 50 px down, then x 64/200
        assert torch.allclose(mapped, torch.tensor([40, 70, 120, 130]) * 0.32)


def test_roi_align_pools_a_hand_made_multi_level_map():
    # stage 0: 8x8 cells of 4 px (a 32-px image), left half 0, right half 1
    fine = torch.zeros(1, 1, 8, 8)
    fine[..., 4:] = 1.0
    coarse = torch.full((1, 2, 4, 4), 5.0)  # stage 1: constant, upsampled to 8x8
    assert multi_level_map([fine, coarse]).shape == (1, 3, 8, 8)
    # torchvision's aligned=False puts cell i's value at map coordinate i (so at pixel 4 i)
    boxes = [torch.tensor([[20.0, 0, 32, 32], [0, 0, 12, 32], [8, 8, 24, 24]])]
    pooled = pool_box_features([fine, coarse], boxes, stride=4, pool_size=4)[0]
    assert pooled.shape == (3, 3)
    assert torch.allclose(pooled[:, 1:], torch.full((3, 2), 5.0))
    assert pooled[0, 0] == 1.0 and pooled[1, 0] == 0.0  # inside the right / left half
    assert 0.3 < pooled[2, 0] < 0.8  # straddles the edge
    # images without boxes give no rows and never touch the big map
    empty = pool_box_features([fine, coarse], [torch.zeros(0, 4)], stride=4)
    assert empty[0].shape == (0, 3)


def test_token_order_grid_then_boxes_and_zero_box_images(tiny_tokenizer):
    torch.manual_seed(0)
    model = MODELS.build(tiny_mg_cfg()).eval()
    n_grid = model.num_visual_tokens((128, 128))
    assert n_grid == 16 and model.low_res_size((128, 128)) == (32, 32)
    assert model.bbox_projector.linear_1.in_features == 8 + 16 + 24 + 32
    pixels = torch.randn(2, 3, 128, 128)
    boxes = [torch.tensor([[0.0, 0, 64, 64], [32, 32, 128, 96]]), torch.zeros(0, 4)]
    # sample 0: text, 16 grid + 2 box slots, text; sample 1: 16 grid slots, text
    ids = torch.tensor([[1, 7] + [IMAGE_TOKEN_INDEX] * 18 + [8, 9],
                        [1] + [IMAGE_TOKEN_INDEX] * 16 + [7, 8, 9, 3, 3]])
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels, boxes=boxes)
        grid0 = model._encode_same_shape(pixels[:1], boxes[:1])[0][:16]
        _, maps = model.high_res_encoder(pixels[:1], return_stages=True)
        feats = pool_box_features(maps, boxes[:1], stride=4, pool_size=4)[0]
        box_tokens = model.bbox_projector(feats)
    assert torch.allclose(embeds[0, 2:18], grid0, atol=1e-6)
    assert torch.allclose(embeds[0, 18:20], box_tokens, atol=1e-6)  # right after the grid
    text = model.llm.get_input_embeddings()(torch.tensor([8, 9]))
    assert torch.allclose(embeds[0, 20:], text)
    with pytest.raises(ValueError, match='2 images give 34 features.*18 \\+ 16|image-token'):
        model.embed_inputs(ids, pixels, boxes=[boxes[0], boxes[0]])

    # a batch where no image has a box trains, and every part still gets a gradient
    model.train()
    ids = torch.tensor([[1, 7] + [IMAGE_TOKEN_INDEX] * 16 + [8, 9, 3, 3],
                        [1] + [IMAGE_TOKEN_INDEX] * 16 + [7, 8, 9, 3, 3]])
    loss = model(ids, labels=ids.masked_fill(ids < 0, -100), pixel_values=pixels,
                 boxes=[torch.zeros(0, 4), torch.zeros(0, 4)],
                 attention_mask=(ids != 3).long())['loss']
    loss = loss + model(ids[:1], labels=ids[:1].masked_fill(ids[:1] < 0, -100),
                        pixel_values=pixels[:1], boxes=None)['loss']
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.bbox_projector.linear_1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # used, zero gradient
    assert model.fusion.proj_high.weight.grad.abs().sum() > 0


def test_plain_llava_refuses_boxes(tiny_model_cfg):
    model = MODELS.build(tiny_model_cfg)
    with pytest.raises(ValueError, match='has no object tokens'):
        model.encode_images(torch.randn(1, 3, 32, 32), boxes=[torch.ones(1, 4)])


# ---------------------------------------------------------------- box data

@pytest.fixture
def boxed_data(tiny_llava_files):
    """tiny_llava_files plus a box file (one degenerate and one out-of-image box)."""
    boxes = {'red.png': dict(boxes=[[2, 2, 10, 12], [5, 5, 5, 9], [20, 20, 40, 30]],
                             labels=['a', 'flat', 'b'], scores=[0.5, 0.9, 0.8]),
             'sub/wide.png': dict(boxes=[], labels=[], scores=[])}
    path = os.path.join(tiny_llava_files['root'], 'boxes.json')
    with open(path, 'w') as f:
        json.dump(boxes, f)
    return dict(tiny_llava_files, boxes=path)


def boxed_dataset(boxed_data, tokenizer, **kwargs):
    return DATASETS.build(dict(type='LLaVADataset', data_path=boxed_data['json'],
                               image_folder=boxed_data['image_folder'], tokenizer=tokenizer,
                               template='vicuna_v1', box_file=boxed_data['boxes'],
                               image_processor=dict(type='LLaVAImageProcessor', size=64,
                                                    token_stride=16), **kwargs))


def test_dataset_reserves_one_slot_per_box_clips_drops_and_caps(boxed_data, tiny_tokenizer):
    dataset = boxed_dataset(boxed_data, tiny_tokenizer)
    item = dataset[0]  # red.png 32x32 -> 64: x2; the flat box is dropped, (20,20,40,30) clipped
    assert torch.equal(item['boxes'], torch.tensor([[40.0, 40, 64, 60], [4, 4, 20, 24]]))
    assert int((item['input_ids'] == IMAGE_TOKEN_INDEX).sum()) == 16 + 2
    assert dataset[1]['boxes'].shape == (0, 4)  # annotated, no objects
    assert int((dataset[1]['input_ids'] == IMAGE_TOKEN_INDEX).sum()) == 16
    assert dataset[2]['boxes'] is None  # text-only
    capped = boxed_dataset(boxed_data, tiny_tokenizer, max_boxes=1)
    assert torch.equal(capped[0]['boxes'], torch.tensor([[40.0, 40, 64, 60]]))  # best score
    with pytest.raises(Exception, match=r"index 3 \(id s3\).*'tall.png' has no entry"):
        dataset[3]
    from mllm.datasets.collate import llava_collate
    batch = llava_collate([dataset[0], dataset[2], dataset[1]])
    assert [b.shape[0] for b in batch['boxes']] == [2, 0]  # per image, in image order


def test_check_data_reports_box_problems(boxed_data, tiny_tokenizer, capsys, tmp_path):
    config = tmp_path / 'cfg.py'
    config.write_text(
        f"_base_ = ['{CONFIG_ROOT}/tiny/tiny_llava_synthetic.py']\n"
        f"train_dataloader = dict(dataset=dict(data_path='{boxed_data['json']}', "
        f"image_folder='{boxed_data['image_folder']}', box_file='{boxed_data['boxes']}'))\n")
    tokenizer_dir = tmp_path / 'tok'
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    assert main(['check-data', str(config), '--cfg-options',
                 f'tokenizer.pretrained={tokenizer_dir}']) == 1
    err = capsys.readouterr().err
    assert "index 0 (id s0): box file" in err and 'degenerate' in err and 'outside' in err
    assert "index 3 (id s3): image 'tall.png' has no entry" in err


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize('llm', list(LLM_PARAMS))
def test_recipes_inspect_sizes_templates_and_deepspeed(llm, capsys):
    capsys.readouterr()
    assert main(['inspect', f'mgllava_{llm}_finetune', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    params, hidden = report['params'], HIDDEN[llm]
    assert params['llm'] == LLM_PARAMS[llm]
    assert params['vision'] == 303_507_456 and params['vision_high_res'] == 196_227_264
    assert params['fusion'] == 6_085_121
    assert params['bbox_projector'] == (2880 * hidden + hidden) + (hidden * hidden + hidden)
    assert report['visual_tokens'] == 576
    assert report['trainable_params'] == (params['llm'] + params['projector'] +
                                          params['fusion'] + params['bbox_projector'])
    cfg = load_config(f'mgllava_{llm}_finetune')
    assert cfg.template == TEMPLATES[llm]
    assert cfg.deepspeed == ('zero3' if llm == 'yi34b' else 'zero2')
    assert cfg.optim_wrapper.optimizer.lr == 2e-5
    assert cfg.train_dataloader.sampler.type == 'LengthGroupedSampler'
    pretrain = load_config(f'mgllava_{llm}_pretrain')
    assert pretrain.optim_wrapper.optimizer.lr == 1e-3
    assert pretrain.train_dataloader.dataset.template == TEMPLATES[llm]  # not `plain`
    assert sorted(pretrain.model.trainable) == ['bbox_projector', 'fusion', 'projector']


# ---------------------------------------------------------------- tiny model, real CLI

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=64,
                                  num_val=8)


def test_tiny_mgllava_trains_and_chats_with_boxes(tmp_path, synthetic, capsys):
    options = ['train_cfg.max_iters=3', 'default_hooks.logger.interval=1',
               'default_hooks.checkpoint.interval=3', 'train_dataloader.batch_size=4',
               f'train_dataloader.dataset.data_path={synthetic["train"]}',
               f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}',
               f'train_dataloader.dataset.box_file={synthetic["boxes"]}',
               f'tokenizer.pretrained={synthetic["tokenizer"]}']
    result = subprocess.run([sys.executable, '-m', 'mllm', 'train',
                             'configs/tiny/tiny_mgllava_synthetic.py', '--work-dir',
                             str(tmp_path), '--cfg-options', *options],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / 'iter_3.pth', weights_only=True)['state_dict']
    assert {'fusion.gate.0.weight', 'bbox_projector.linear_1.weight',
            'high_res_encoder.stem.0.weight'} <= set(state)
    # the fused path moved away from plain LLaVA
    assert state['fusion.proj_high.weight'].abs().sum() > 0

    # export: a self-contained folder with both encoders, fusion and bbox projector whose
    # logits equal the training model's on a batch with boxes
    from mllm.inference.export import load_pretrained
    from mllm.inference.inference import load_model
    out = tmp_path / 'export'
    config = 'configs/tiny/tiny_mgllava_synthetic.py'
    tokenizer_option = f'tokenizer.pretrained={synthetic["tokenizer"]}'
    assert main(['convert', 'pth-to-hf', config, str(tmp_path / 'iter_3.pth'), str(out),
                 '--cfg-options', tokenizer_option]) == 0
    meta = json.loads((out / 'mllm_config.json').read_text())
    assert {'high_res_encoder', 'fusion', 'bbox_projector'} <= set(meta['weights'])
    assert meta['model']['high_res_encoder']['load_weights'] is False
    exported = load_pretrained(str(out))[0]
    cfg = load_config(config, {tokenizer_option.split('=')[0]: synthetic['tokenizer'],
                               'train_dataloader.dataset.box_file': synthetic['boxes']})
    reference = load_model(cfg, str(tmp_path / 'iter_3.pth'))
    dataset = DATASETS.build(dict(cfg.train_dataloader.dataset, data_path=synthetic['train'],
                                  image_folder=synthetic['image_folder']))
    from mllm.datasets.collate import llava_collate
    picks = [i for i, x in enumerate(dataset.samples) if x['category'] in ('count', 'fine_detail')]
    batch = llava_collate([dataset[i] for i in picks[:3] + [0]])
    assert sum(len(b) for b in batch['boxes']) > 4  # several shapes, or shape + detail box
    batch.pop('labels')
    with torch.no_grad():
        assert torch.equal(exported(**batch, mode='tensor'), reference(**batch, mode='tensor'))

    image = os.path.join(synthetic['image_folder'], 'val', '000000.png')
    args = ['chat', 'configs/tiny/tiny_mgllava_synthetic.py', '--checkpoint',
            str(tmp_path / 'iter_3.pth'), '--image', image, '--prompt', 'What shape is shown?',
            '--boxes', synthetic['boxes'], '--max-new-tokens', '2',
            '--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}']
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.startswith('ASSISTANT: ')
    missing = os.path.join(synthetic['image_folder'], '..', 'nope.json')
    assert main(args[:-4] + ['--boxes', missing] + args[-2:]) == 1


def test_chat_prompt_with_boxes_is_the_training_encoding(synthetic):
    """MG-LLaVA's public chat preprocessed images and boxes unlike its training; here both
    go through the same code (select_boxes, the image processor, the template)."""
    from mllm.datasets.boxes import load_box_file
    from mllm.inference.inference import last_answer_start, load_image, prompt_inputs

    cfg = load_config('configs/tiny/tiny_mgllava_synthetic.py',
                      {'tokenizer.pretrained': synthetic['tokenizer']})
    dataset = DATASETS.build(dict(cfg.train_dataloader.dataset, data_path=synthetic['train'],
                                  image_folder=synthetic['image_folder'],
                                  box_file=synthetic['boxes']))
    entries = load_box_file(synthetic['boxes'])
    index = next(i for i, x in enumerate(dataset.samples) if x['category'] == 'count')
    sample, item = dataset.samples[index], dataset[index]
    batch = prompt_inputs(sample['conversations'][:1], dataset.tokenizer, dataset.template,
                          dataset.image_processor,
                          load_image(os.path.join(synthetic['image_folder'], sample['image'])),
                          box_entry=entries[sample['image']], max_boxes=dataset.max_boxes)
    start = last_answer_start(item['labels'])
    assert torch.equal(batch['input_ids'][0], item['input_ids'][:start])
    assert torch.equal(batch['boxes'][0], item['boxes']) and len(item['boxes']) >= 1
    assert torch.equal(batch['pixel_values'][0], item['pixel_values'])


def test_dummy_image_gives_the_vit_its_native_size():
    """Text-only ranks run the vision path on a blank image (ZeRO-3 / DDP); for MG-LLaVA its
    CLIP input must be the ViT's native size (no position-embedding interpolation)."""
    model = MODELS.build(tiny_mg_cfg())
    dummy = model.dummy_pixel_values('cpu')
    assert dummy.shape == (1, 3, 128, 128)
    assert model.low_res_size(dummy.shape[-2:]) == (32, 32) == (
        model.vision_encoder.model.config.image_size,) * 2
    assert model.encode_images(dummy).shape == (16, TINY_LLM_CONFIG['hidden_size'])
