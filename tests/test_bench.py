"""Benchmarks: the faster training path gives the reference loss, both benchmark paths see
the same samples, the JSON keys, and the FLOPs / projection arithmetic."""
import json

import pytest
import torch

from mllm.datasets.collate import (flat_llava_collate, llava_collate, pack_rows,
                                   packed_llava_collate)
from mllm.bench.benchmark import (A100_BF16_PEAK, collapse_image_runs, project_hours,
                                   train_flops_per_sample)
from mllm.registry import MODELS


def _instances(lengths, num_visual=16, image_size=32, seed=1):
    """Samples of the given text lengths; every third is text-only, first half unlabelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 256, (n,), generator=g)
        ids[0] = 1
        labels = ids.clone()
        labels[:n // 2] = -100
        pixels = None
        if i % 3 != 2:
            ids = torch.cat([ids[:1], torch.full((num_visual,), -200), ids[1:]])
            labels = torch.cat([labels[:1], torch.full((num_visual,), -100), labels[1:]])
            pixels = torch.randn(3, image_size, image_size, generator=g)
        out.append(dict(input_ids=ids, labels=labels, pixel_values=pixels, index=10 + i))
    return out


@pytest.fixture
def trainable_model(tiny_model_cfg):
    torch.manual_seed(0)
    tiny_model_cfg['trainable'] = ['projector', 'llm']
    tiny_model_cfg['llm']['attn_implementation'] = 'sdpa'
    model = MODELS.build(tiny_model_cfg)
    # HF's init (std 0.02) leaves attention near-uniform and its output tiny, so a leak
    # between packed samples would hardly move the loss; larger weights make it count
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def test_pack_rows_first_fit_decreasing():
    # decreasing: 50 | 30 + 20 | 12 + 10 + 7
    assert pack_rows([30, 10, 12, 50, 7, 20], 50) == [[0, 5], [1, 2, 4], [3]]
    with pytest.raises(ValueError, match='sample 1 has 9 tokens, more than the pack length 8'):
        pack_rows([3, 9], 8)


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
def test_packed_loss_and_grads_equal_padded(trainable_model, attn):
    """Packing several samples per row with per-sample attention is the same computation,
    through per-segment SDPA (sdpa) and the block-diagonal mask (eager)."""
    model = trainable_model
    model.llm.config._attn_implementation = attn
    instances = _instances([30, 10, 12, 50, 7, 20])
    padded, packed = llava_collate(instances), packed_llava_collate(instances)
    assert packed['input_ids'].shape[0] < padded['input_ids'].shape[0]  # it did pack
    assert packed['sample_rows'] == [[10, 15], [11, 12, 14], [13]]
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch)['loss']
        loss.backward()
        grads.append((loss.detach(), model.projector.linear_1.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    # eager reference vs SDPA per segment: summation order differs (grads are ~1e-3)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-6)
    # control: the same packed rows with one plain causal mask let samples see each other
    leaky = dict(packed, attention_mask=torch.ones_like(packed['input_ids']))
    # (> 1e-3: 1000x the tolerance above; 0.005 under transformers 5.25's initialisation)
    assert abs(model(**leaky)['loss'].item() - grads[0][0].item()) > 1e-3


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch)['loss']
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize('checkpointing', [False, True])
def test_flat_batch_equals_padded(trainable_model, monkeypatch, checkpointing):
    """One flattened row (no padding, attention per sample segment, no mask built) gives
    the padded batch's loss and every projector and LLM gradient, also when gradient
    checkpointing recomputes the layers; the same row with attention across the whole
    row (no segment isolation) does not."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mllm.engine.patches import sdpa_segment_masks
    from mllm.models import llava, varlen_attention
    model = trainable_model
    if checkpointing:
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={'use_reentrant': False})
    instances = _instances([30, 10, 12, 50, 7, 20])
    padded, flat = llava_collate(instances), flat_llava_collate(instances)
    lengths = [len(x['input_ids']) for x in instances]
    assert flat['input_ids'].shape == (1, sum(lengths))  # every position is a real token
    assert flat['sample_rows'] == [[10, 11, 12, 13, 14, 15]]
    assert varlen_attention.segment_starts(flat['position_ids']).tolist() == [
        sum(lengths[:k]) for k in range(len(lengths) + 1)]
    reference = _loss_and_grads(model, padded)
    segments = []  # what reaches the attention function: the 1-D boundaries, no T x T mask
    sdpa_segment_masks()
    sdpa = ALL_ATTENTION_FUNCTIONS['sdpa']

    def spy(m, q, k, v, mask, **kw):
        if mask is not None:  # transformers 5's CLIP attention comes here too, without a mask
            segments.append(mask.dim())
        return sdpa(m, q, k, v, mask, **kw)

    spy.passes_segments = sdpa  # already patched: keep the spy in front
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, 'sdpa', spy)
    ours = _loss_and_grads(model, flat)
    assert segments == [1] * (4 if checkpointing else 2)  # 2 layers (+ recomputation)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(ours[1:], reference[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # control: one segment spanning the row = plain causal attention across samples
    monkeypatch.setattr(llava, 'segment_starts',
                        lambda p: torch.tensor([0, p.numel()], dtype=torch.int32))
    assert abs(_loss_and_grads(model, flat)[0].item() - reference[0].item()) > 0.01


def test_segment_masks_only_where_supported(trainable_model):
    """Eager attention, sliding windows and flash-attention-2 keep the block-diagonal mask
    / position-id path; segment masks are refused with a KV cache."""
    from mllm.models.varlen_attention import segment_sdpa_attention, supports_varlen
    config = trainable_model.llm.config
    assert supports_varlen(config)
    config.sliding_window = 16
    assert not supports_varlen(config)
    config.sliding_window = None
    for attn in ('eager', 'flash_attention_2'):
        config._attn_implementation = attn
        assert not supports_varlen(config)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match='not a KV cache'):
        segment_sdpa_attention(None, q, torch.zeros(1, 4, 5, 16), torch.zeros(1, 4, 5, 16),
                               torch.tensor([0, 1], dtype=torch.int32))


def test_answer_only_head_equals_hf_loss(trainable_model):
    """The LM head on learned positions only gives HF's full-logits loss."""
    batch = llava_collate(_instances([25, 40, 9, 33]))
    ours = trainable_model(**batch)['loss']
    embeds = trainable_model.embed_inputs(batch['input_ids'], batch['pixel_values'])
    reference = trainable_model.llm(inputs_embeds=embeds, attention_mask=batch['attention_mask'],
                                    labels=batch['labels']).loss
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


# the four decoder families decode_learned_rows mirrors, as tiny random configs
_FAMILIES = {
    'llama': dict(model_type='llama'),
    'mistral': dict(model_type='mistral', sliding_window=None),
    'qwen2': dict(model_type='qwen2', use_sliding_window=False),
    'phi3': dict(model_type='phi3', pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                 attention_dropout=0.0),
}


@pytest.mark.parametrize('family', sorted(_FAMILIES))
@pytest.mark.parametrize('layout', ['padded', 'flat'])
@pytest.mark.parametrize('checkpointing', [False, True])
def test_answer_only_last_layer_equals_full_decoder(tiny_model_cfg, family, layout,
                                                     checkpointing):
    """The last layer's MLP at learned positions only gives HF's loss and every gradient,
    padded or flat (segment masks), with and without gradient checkpointing; and the MLP
    does see only those positions."""
    from conftest import TINY_LLM_CONFIG
    cfg = dict(tiny_model_cfg, trainable=['projector', 'llm'],
               gradient_checkpointing=checkpointing)
    cfg['llm'] = dict(type='HFCausalLM', attn_implementation='sdpa',
                      config=dict(TINY_LLM_CONFIG, **_FAMILIES[family]))
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    with torch.no_grad():  # larger weights than HF's init, so every part moves the loss
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.train()
    instances = _instances([25, 40, 9, 33])
    batch = (llava_collate if layout == 'padded' else flat_llava_collate)(instances)
    learned = int((batch['labels'][:, 1:] != -100).sum())
    mlp_rows = []
    last_mlp = model.llm.get_decoder().layers[-1].mlp
    hook = last_mlp.register_forward_hook(lambda m, i, o: mlp_rows.append(i[0].shape[:-1].numel()))
    ours = _loss_and_grads(model, batch)
    hook.remove()
    model.answer_only_last_layer = False
    reference = _loss_and_grads(model, batch)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(ours[1:], reference[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # HF's own loss (full logits), for the padded layout it can take
    if layout == 'padded':
        embeds = model.embed_inputs(batch['input_ids'], batch['pixel_values'])
        hf = model.llm(inputs_embeds=embeds, attention_mask=batch['attention_mask'],
                       labels=batch['labels']).loss
        torch.testing.assert_close(ours[0], hf, rtol=1e-5, atol=1e-6)
    # the MLP ran at the learned positions only (once more when checkpointing recomputes)
    assert mlp_rows == [learned] * (2 if checkpointing else 1)
    assert learned < batch['input_ids'].numel() // 2


def test_answer_only_last_layer_falls_back_outside_the_mirrored_release(trainable_model,
                                                                       monkeypatch):
    """Under another transformers release the loss runs HF's own decoder forward (full last
    layer) rather than a mirror of a forward that may have changed; same loss."""
    from mllm.models import llms
    batch = llava_collate(_instances([25, 40, 9, 33]))
    mirrored = trainable_model(**batch)['loss']
    monkeypatch.setattr(llms, 'MIRRORED_TRANSFORMERS', '0.0.')
    mlp_rows = []
    last_mlp = trainable_model.llm.get_decoder().layers[-1].mlp
    last_mlp.register_forward_hook(lambda m, i, o: mlp_rows.append(i[0].shape[:-1].numel()))
    torch.testing.assert_close(trainable_model(**batch)['loss'], mirrored, rtol=1e-6, atol=1e-6)
    assert mlp_rows == [batch['input_ids'].numel()]


def test_mllm_loss_equals_stock_xtuner_loss(saved_tiny_checkpoints, tiny_model_cfg):
    """Same weights, same batch: mllm's packed path gives stock XTuner LLaVAModel's loss."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel as XTunerLLaVA

    from mllm.bench.benchmark import copy_projector
    cfg = dict(tiny_model_cfg, trainable=['projector', 'llm'])
    cfg['llm'] = dict(type='HFCausalLM', pretrained=saved_tiny_checkpoints['llm'],
                      attn_implementation='sdpa')
    cfg['vision_encoder'] = dict(type='CLIPVisionEncoder',
                                 pretrained=saved_tiny_checkpoints['vision'])
    ours = MODELS.build(cfg)
    theirs = XTunerLLaVA(
        llm=AutoModelForCausalLM.from_pretrained(saved_tiny_checkpoints['llm'],
                                                 attn_implementation='sdpa'),
        visual_encoder=CLIPVisionModel.from_pretrained(saved_tiny_checkpoints['vision']),
        freeze_visual_encoder=True, use_activation_checkpointing=False)
    copy_projector(ours, theirs)
    instances = _instances([30, 10, 12, 50, 7, 20])
    ours_loss = ours(**packed_llava_collate(instances))['loss']
    # XTuner's layout: one -200 per image, expanded inside its model
    from xtuner.dataset.collate_fns import default_collate_fn
    xt = []
    for x in instances:
        ids, labels = collapse_image_runs(x['input_ids'].tolist(), x['labels'].tolist())
        pixels = x['pixel_values'] if x['pixel_values'] is not None else torch.zeros(3, 32, 32)
        xt.append(dict(input_ids=ids, labels=labels, pixel_values=pixels))
    theirs_loss = theirs(default_collate_fn(xt)['data'], mode='loss')['loss']
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-5)


def test_collapse_image_runs():
    assert collapse_image_runs([1, -200, -200, -200, 7, -200, 8]) == [1, -200, 7, -200, 8]
    assert collapse_image_runs([1, -200, -200, 7], [-100, -100, -100, 7]) == (
        [1, -200, 7], [-100, -100, 7])


def test_bench_train_cli_json(tmp_path, capsys, monkeypatch):
    """A short side-by-side run: JSON keys, same samples per step, equal losses; each path
    recomputes what it claims (XTuner every LLM layer, mllm its per-step layers), counted
    as attention calls: both models train in training mode, as their runners set it."""
    from transformers.models.llama import modeling_llama

    from mllm.cli import main
    attention = modeling_llama.LlamaAttention.forward
    calls = []
    monkeypatch.setattr(modeling_llama.LlamaAttention, 'forward',
                        lambda self, *a, **k: calls.append(1) or attention(self, *a, **k))
    assert main(['bench', 'train', '--json', '--steps', '3', '--batch-size', '4',
                 '--samples', '24', '--llm-layers', '4', '--checkpointing',
                 '--work-dir', str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recomputed = result['checkpoint_layers_per_step']
    assert len(recomputed) == 3 and result['xtuner_checkpointing']
    assert len(calls) == 3 * 2 * 4 + sum(4 + k for k in recomputed)
    assert {'mllm_tokens_per_s', 'xtuner_tokens_per_s', 'ratio'} <= set(result)
    assert result['same_samples'] is True
    assert result['ratio'] == pytest.approx(result['mllm_tokens_per_s'] /
                                            result['xtuner_tokens_per_s'])
    assert len(result['mllm_losses']) == len(result['xtuner_losses']) == 3
    assert result['max_loss_diff'] < 1e-4  # identical models, ids and batches


def test_flops_per_sample_and_projection():
    # vicuna7b LLaVA-1.5 finetune sample: 1 + 576 + 300 tokens
    flops = train_flops_per_sample(6_738_415_616, 32, 4096, 877, vision_forward_flops=0.0)
    assert flops == 877 * (6 * 6_738_415_616 + 12 * 32 * 4096 * 877)
    frozen = train_flops_per_sample(100, 1, 8, 10, 5.0, llm_trainable=False)
    assert frozen == 10 * (4 * 100 + 12 * 8 * 10) + 5.0
    # 1e18 FLOPs x 1e6 samples on 8 GPUs at 50% of 312 TFLOP/s
    assert project_hours(1e18, 10 ** 6, 0.5) == pytest.approx(
        1e24 / (8 * A100_BF16_PEAK * 0.5) / 3600)
    with pytest.raises(ValueError, match='mfu'):
        project_hours(1.0, 1, 0.0)


def test_bench_step_cpu_path():
    """The GPU script's step on a tiny config, on CPU: consistent throughput arithmetic."""
    from mllm.bench.benchmark import bench_step
    from mllm.engine.config import load_config
    result = bench_step(load_config('configs/tiny/tiny_llava_synthetic.py'), device='cpu',
                        steps=1, batch=2, text_tokens=20)
    assert result['seq_len'] == 1 + 64 + 20 and result['visual_tokens'] == 64
    assert result['tokens_per_s'] == pytest.approx(2 * 85 / result['step_s'])
    assert result['mfu_vs_a100'] == pytest.approx(
        result['flops_per_sample'] * 2 / result['step_s'] / A100_BF16_PEAK)
    assert result['projected_hours_8xA100'] == pytest.approx(project_hours(
        result['flops_per_sample'], 665_298, result['mfu_vs_a100']))


def test_bench_step_without_config_fails(capsys):
    from mllm.cli import main
    assert main(['bench', 'step']) == 1
    assert 'needs --config' in capsys.readouterr().err


def test_packed_collate_keeps_boxes_with_their_images():
    """MG-LLaVA: boxes follow the packed image order (text-only samples have none)."""
    instances = _instances([30, 10, 12, 50])  # sample 2 is text-only
    for k, x in enumerate(instances):
        if x['pixel_values'] is not None:
            x['boxes'] = torch.full((k + 1, 4), float(k))
    packed = packed_llava_collate(instances)
    order = [i - 10 for row in packed['sample_rows'] for i in row if i - 10 != 2]
    assert [b[0, 0].item() for b in packed['boxes']] == order
    assert [len(b) for b in packed['boxes']] == [k + 1 for k in order]


def test_recipe_flops_vicuna7b_finetune_on_meta():
    """FLOPs per sample of the LLaVA-1.5 7B finetune from its architecture (no weights)."""
    from mllm.bench.benchmark import recipe_flops
    from mllm.engine.config import load_config
    result = recipe_flops(load_config('llava15_vicuna7b_finetune'), 'finetune')
    assert result['seq_len'] == 1 + 576 + 300 and result['llm_trainable']
    vision = result['vision_forward_flops']
    # CLIP ViT-L/14-336 up to layer -2: ~2 x 303.5 M params x 577 tokens plus attention
    assert 2 * 290e6 * 577 < vision < 0.45e12
    assert result['flops_per_sample'] == train_flops_per_sample(6_738_415_616, 32, 4096, 877,
                                                                vision)


@pytest.mark.parametrize('flat', [False, True])
def test_train_with_packed_collate_from_a_config(tmp_path, flat):
    """Packing, or padding-free batches with SDPA segment attention and the token cache,
    are config switches for `mllm train`; throughput is still logged."""
    from mllm.cli import main
    from mllm.datasets.synthetic import generate_synthetic_vqa
    data = generate_synthetic_vqa(str(tmp_path / 'data'), num_train=32, num_val=0)
    work_dir = tmp_path / 'run'
    options = ['train_dataloader.collate_fn.type=mllm.packed_llava_collate']
    if flat:
        options = ['train_dataloader.collate_fn.type=mllm.flat_llava_collate',
                   'llm.attn_implementation=sdpa',
                   f'train_dataloader.dataset.token_cache={tmp_path / "token_cache"}']
    assert main(['train', 'configs/tiny/tiny_llava_synthetic.py', '--work-dir', str(work_dir),
                 '--cfg-options', *options,
                 'train_dataloader.batch_size=8', 'train_cfg.max_iters=2',
                 'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=2',
                 f'train_dataloader.dataset.data_path={data["train"]}',
                 f'train_dataloader.dataset.image_folder={data["image_folder"]}',
                 f'tokenizer.pretrained={data["tokenizer"]}']) == 0
    scalars = [json.loads(line) for path in work_dir.glob('*/vis_data/scalars.json')
               for line in path.read_text().splitlines()]
    logged = [s for s in scalars if 'loss' in s]
    assert len(logged) == 2 and all(s['tokens_per_s'] > 0 for s in logged)
    assert len(list((tmp_path / 'token_cache').glob('*/ids.npy'))) == (1 if flat else 0)
