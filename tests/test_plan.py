"""`mllm plan`: per-GPU memory under each ZeRO stage and the recompute policy that fits it
(formulas in mllm.bench.memory)."""
import json

import pytest
import torch

from helpers import swap_config
from mllm.bench.memory import (PARTS, STAGES, Batch, Transformer, activation_gb,
                               model_state_gb, plan_memory, plan_policy,
                               resolve_auto_checkpointing, worst_batch)
from mllm.cli import main
from mllm.engine.config import load_config


def plan_json(capsys, *args):
    capsys.readouterr()
    assert main(['plan', *args, '--json']) == 0
    return json.loads(capsys.readouterr().out)


def test_model_states_follow_the_zero_paper():
    """16 bytes per trainable parameter (2 + 2 + 12), sharded stage by stage."""
    psi, n = 10**9, 8
    assert model_state_gb('none', psi, psi, n, 0) == dict(weights=2, gradients=2, optimizer=12,
                                                          working_set=0)
    assert model_state_gb('zero1', psi, psi, n, 0)['optimizer'] == 1.5
    assert model_state_gb('zero2', psi, psi, n, 0)['gradients'] == 0.25
    assert model_state_gb('zero3', psi, psi, n, 10**8) == dict(
        weights=0.25, gradients=0.25, optimizer=1.5, working_set=0.4)
    # frozen parameters have no gradients and no optimizer state
    assert model_state_gb('zero1', psi, 0, n, 0) == dict(weights=2, gradients=0, optimizer=0,
                                                         working_set=0)


def test_activations_use_korthikanti_per_layer_formula():
    """34·T·h per block (+ 5·a·s·T eager), 2·T·h for a checkpointed one plus one block live
    during its recompute; logits at learned positions only with the answer-only head."""
    llm = Transformer(layers=4, hidden=4096, heads=32, flash=False)
    batch = Batch(micro_batch=1, tokens=2048, longest=2048, learned=100, images=1, source='')
    th = 2048 * 4096
    block = 34 * th + 5 * 32 * 2048 * 2048
    parts = activation_gb(llm, 32000, batch, 0, answer_only_head=False)
    assert parts['activations_gb'] == pytest.approx(4 * block / 1e9)
    assert parts['logits_gb'] == pytest.approx(10 * 2048 * 32000 / 1e9)
    assert activation_gb(llm, 32000, batch, 0)['logits_gb'] == pytest.approx(10 * 100 * 32000 / 1e9)
    llm.flash = True
    # the backward frees the last (kept) block before it recomputes a checkpointed one
    assert activation_gb(llm, 32000, batch, 3)['activations_gb'] == pytest.approx(
        (34 * th * 1 + 2 * th * 3) / 1e9)
    assert activation_gb(llm, 32000, batch, 4)['activations_gb'] == pytest.approx(
        (2 * th * 4 + 34 * th) / 1e9)


def _saved_bytes_per_token(layer, hidden: int, tokens: int, **kwargs) -> float:
    """What autograd keeps for the backward of one real layer in bf16: every saved tensor's
    storage once, the layer's own weights left out."""
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x, **kwargs)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights) / tokens


@pytest.mark.parametrize('model_type,hidden,intermediate,heads,kv_heads', [
    ('llama', 256, 688, 4, 4),    # vicuna's proportions (i = 2.6875 h)
    ('llama', 256, 1024, 8, 2),   # grouped-query attention (Llama-3, Yi-34B)
    ('qwen2', 256, 704, 4, 2),    # biased q/k/v projections
])
def test_llm_block_bytes_are_what_transformers_layer_saves(model_type, hidden, intermediate,
                                                          heads, kv_heads):
    """The planner's bytes per token for an LLM block equal what autograd saves in
    transformers' own decoder layer (SDPA, bf16), tensor for tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm.bench.memory import block_bytes_per_token
    config = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=intermediate,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  num_hidden_layers=1, vocab_size=64,
                                  attn_implementation='sdpa')
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    tokens = 128
    positions = torch.arange(tokens)[None]
    rope = model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    saved = _saved_bytes_per_token(model.model.layers[0], hidden, tokens, attention_mask=None,
                                   position_ids=positions, position_embeddings=rope)
    planned = block_bytes_per_token(Transformer(layers=1, hidden=hidden, heads=heads,
                                                flash=True, intermediate=intermediate,
                                                kv_heads=kv_heads))
    assert planned == pytest.approx(saved, rel=0.01)
    assert planned > 40 * hidden  # Korthikanti's 34 h undercounts a Llama layer


def test_vision_block_bytes_are_what_clip_layer_saves():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mllm.bench.memory import block_bytes_per_token
    config = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                              num_hidden_layers=1, image_size=32, patch_size=8,
                              attn_implementation='sdpa')
    model = CLIPVisionModel(config).to(torch.bfloat16).train()
    layer = next(m for m in model.modules() if type(m).__name__ == 'CLIPEncoderLayer')
    saved = _saved_bytes_per_token(layer, 128, 64, attention_mask=None)
    planned = block_bytes_per_token(Transformer(layers=1, hidden=128, heads=4, flash=True,
                                                intermediate=512, gated=False))
    assert planned == pytest.approx(saved, rel=0.01)


def test_each_stage_total_is_the_sum_of_its_parts(capsys):
    """Nothing is left out of the per-GPU total (the optimizer state included)."""
    report = plan_json(capsys, 'llava15_vicuna7b_finetune')
    for stage, row in report['stages'].items():
        assert row['memory_gb'] == pytest.approx(sum(row[p] for p in PARTS), abs=0.011), stage
        assert row['optimizer'] > 10 or stage == 'zero3_offload'
        assert {'memory_gb', 'fits', 'micro_batch', 'checkpoint_layers',
                'recompute_share'} <= set(row)


def test_vicuna7b_finetune_zero2_total_worked_by_hand(capsys):
    """LLaVA-1.5-7B finetune, 8 x 80 GB, ZeRO-2, 16 x 2048 tokens (no data given), with the
    recipe's compiled RMSNorm / SwiGLU: the policy checkpoints 22 of 32 layers. By hand, in
    GB:"""
    params, trainable = 7_062_902_784, 6_759_395_328  # mllm inspect
    tokens, h, i, heads = 16 * 2048, 4096, 11008, 32
    # a kept Llama layer per token, fused: bf16 norm inputs and h-wide inputs 12h, k and v
    # 4h, RoPE 4 x 128, log-sum-exp 4 x 32, SwiGLU gate and up 4i (the product is
    # recomputed), rsqrt 8
    kept = 12 * h + 4 * i + 4 * h + 4 * 128 + 4 * heads + 8
    assert kept == 110_216
    expected = (2 * params / 1e9                       # bf16 weights, replicated
                + 2 * trainable / 8 / 1e9              # bf16 gradients, sharded
                + 12 * trainable / 8 / 1e9             # fp32 master + Adam moments, sharded
                + (kept * (32 - 22) + 2 * h * 22) * tokens / 1e9  # activations
                + 10 * 16 * (2048 - 576) * 32000 / 1e9  # answer-only logits (text positions)
                + 3.0)                                 # CUDA context, fragmentation
    assert expected == pytest.approx(78.51, abs=0.01)
    report = plan_json(capsys, 'llava15_vicuna7b_finetune', '--gpus', '8', '--gpu-mem', '80')
    zero2 = report['stages']['zero2']
    assert zero2['checkpoint_layers'] == 22 and zero2['micro_batch'] == 16
    # one more kept layer (3.34 GB) would not fit
    assert expected + (kept - 2 * h) * tokens / 1e9 > 80
    assert zero2['memory_gb'] == pytest.approx(expected, abs=0.02)
    # README: vicuna7b finetuning runs ZeRO-2, the stage with the least recompute at DDP's
    # communication volume; every stage fits with the planned policy, none without recompute
    assert report['recommended'] == 'zero2' and report['cheapest'] == 'zero1'
    assert zero2['recompute_share'] < report['stages']['zero1']['recompute_share'] < 1 / 3 + 0.01
    assert not any(row['memory_gb_without_checkpointing'] <= 80
                   for row in report['stages'].values())


@pytest.mark.parametrize('gpu_mem', [40.0, 80.0, 141.0])
def test_planned_policy_fits_and_is_the_least_recompute(gpu_mem):
    """Per stage: the planned total fits, and one checkpointed layer fewer would not."""
    cfg = load_config('llava15_vicuna7b_finetune')
    report = plan_memory(cfg, gpus=8, gpu_mem_gb=gpu_mem)
    llm = Transformer(layers=32, hidden=4096, heads=32, flash=True, intermediate=11008,
                      fused=True)
    batch = worst_batch(16, 2048, 576, flat=True)
    for stage, row in report['stages'].items():
        if not row['fits']:
            assert row['checkpoint_layers'] == 32, stage
            continue
        assert row['memory_gb'] <= gpu_mem, stage
        k = row['checkpoint_layers']
        if k:
            fewer = activation_gb(llm, 32000, batch, k - 1)
            states = sum(row[p] for p in ('weights', 'gradients', 'optimizer', 'working_set'))
            assert states + 3.0 + sum(fewer.values()) > gpu_mem, stage


def test_plan_policy_prefers_no_recompute_when_it_fits():
    llm = Transformer(layers=8, hidden=256, heads=4, flash=True, params_per_layer=800_000)
    batch = Batch(4, 1000, 400, 300, 4, '')
    assert plan_policy(100.0, llm, 32000, batch, True)['checkpoint_layers'] == 0
    tight = plan_policy(0.14, llm, 32000, batch, True)  # logits alone take 0.096
    assert 0 < tight['checkpoint_layers'] < 8 and tight['fits']
    assert plan_policy(1e-6, llm, 32000, batch, True)['fits'] is False


def test_plan_rejects_zero_gpus(capsys):
    capsys.readouterr()
    assert main(['plan', 'llava15_vicuna7b_finetune', '--gpus', '0']) == 2
    assert '--gpus: must be at least 1, got 0' in capsys.readouterr().err
    with pytest.raises(ValueError, match='gpus must be at least 1'):
        plan_memory(load_config('configs/tiny/tiny_llava_synthetic.py'), gpus=0)


def test_yi34b_full_finetune_fits_only_under_zero3_or_offload(tmp_path, capsys):
    config = swap_config(tmp_path, 'llava15_finetune', 'yi34b')
    report = plan_json(capsys, config, '--gpus', '8', '--gpu-mem', '80')
    stages = report['stages']
    assert not stages['zero1']['fits'] and not stages['zero2']['fits']
    assert report['cheapest'] in ('zero3', 'zero3_offload')
    assert report['trainable_params'] > 34e9
    # model states alone are 16 bytes per trainable parameter over 8 GPUs
    states = sum(stages['zero3'][k] for k in ('weights', 'gradients', 'optimizer'))
    assert states == pytest.approx(16 * report['trainable_params'] / 8 / 1e9, rel=0.01)
    # at one sample per GPU, ZeRO-3 itself fits (no CPU offload needed)
    small = plan_json(capsys, config, '--micro-batch', '1')
    assert small['cheapest'] == 'zero3' and small['recommended'] == 'zero3'


def test_plan_text_output_names_the_cheapest_stage(capsys):
    capsys.readouterr()
    assert main(['plan', 'configs/tiny/tiny_llava_synthetic.py', '--gpus', '1',
                 '--gpu-mem', '16']) == 0
    out = capsys.readouterr().out
    assert 'cheapest stage that fits: zero1' in out and 'zero3_offload' in out
    assert main(['plan', 'llava15_vicuna7b_finetune']) == 0  # 'auto': the per-batch room
    assert ('each micro-batch checkpoints what its own tokens need within the 43.5 GB it '
            "leaves for the LLM's activations (zero2; 110,216 B per token") in (
        capsys.readouterr().out)


def test_plan_reads_real_lengths_from_the_token_cache(tmp_path, capsys):
    """The worst micro-batch of the real data (the longest samples, padding-free) instead
    of micro-batch x max_length."""
    from mllm.datasets.synthetic import generate_synthetic_vqa
    from mllm.registry import DATASETS
    data = generate_synthetic_vqa(str(tmp_path / 'data'), num_train=40, num_val=0)
    options = [f'train_dataloader.dataset.data_path={data["train"]}',
               f'train_dataloader.dataset.image_folder={data["image_folder"]}',
               f'tokenizer.pretrained={data["tokenizer"]}',
               f'train_dataloader.dataset.token_cache={tmp_path / "cache"}',
               'train_dataloader.collate_fn.type=mllm.flat_llava_collate']
    cfg = load_config('configs/tiny/tiny_llava_synthetic.py',
                      dict(o.split('=', 1) for o in options))
    dataset = DATASETS.build(cfg.train_dataloader.dataset)  # builds the cache
    lengths = sorted((len(dataset.encode(i)['input_ids']) for i in range(40)), reverse=True)
    (folder,) = (tmp_path / 'cache').iterdir()
    real = plan_json(capsys, 'configs/tiny/tiny_llava_synthetic.py', '--lengths', str(folder),
                     '--cfg-options', *options)
    assert real['tokens_per_micro_batch'] == sum(lengths[:32]) and real['seq_len'] == lengths[0]
    assert 'token cache' in real['lengths_from']
    assumed = plan_json(capsys, 'configs/tiny/tiny_llava_synthetic.py', '--cfg-options', *options)
    assert assumed['tokens_per_micro_batch'] == 32 * 256
    assert (real['stages']['zero1']['activations_gb']
            < assumed['stages']['zero1']['activations_gb'])
    assert plan_json(capsys, 'configs/tiny/tiny_llava_synthetic.py', '--lengths', 'config',
                     '--cfg-options', *options)['tokens_per_micro_batch'] == sum(lengths[:32])


def test_resolve_auto_for_the_run(monkeypatch):
    """'auto' becomes the plan's policy for the run's GPU memory; without CUDA and without
    gpu_mem_gb nothing is checkpointed, and that is said."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = load_config('llava15_vicuna7b_finetune')
    messages = []
    assert resolve_auto_checkpointing(cfg, logger=messages.append) is None
    assert cfg.model.gradient_checkpointing == dict(llm=0, vision=False)
    assert 'no CUDA device' in messages[0]
    from mllm.engine.runner import use_deepspeed
    cfg = load_config('llava15_vicuna7b_finetune', {'gpu_mem_gb': 80})
    use_deepspeed(cfg, 'zero2')
    row = resolve_auto_checkpointing(cfg, gpus=8, logger=messages.append)
    policy = cfg.model.gradient_checkpointing
    assert policy['llm'] == row['checkpoint_layers'] and policy['vision'] is False
    assert 0 < row['checkpoint_layers'] < 32 and 'zero2' in messages[-1]
    # per micro-batch: the worst one (16 x 2048 tokens) gets the plan's layers, and the
    # room is what that plan leaves for the LLM's activations
    from mllm.models.llms import layers_to_checkpoint
    per_batch = policy['per_batch']
    assert per_batch["kept"] == 110_216 and per_batch['checkpointed'] == 2 * 4096
    assert layers_to_checkpoint(16 * 2048, 32, **per_batch) == row['checkpoint_layers']
    assert per_batch['room_gb'] == pytest.approx(
        80 - sum(row[p] for p in ('weights', 'gradients', 'optimizer', 'working_set',
                                  'logits_gb', 'overhead_gb')), abs=0.02)
    # half the tokens, far fewer layers
    assert layers_to_checkpoint(8 * 2048, 32, **per_batch) < row['checkpoint_layers'] - 8


def _tiny_llava(checkpointing):
    from mllm.models.llava import LLaVAModel
    torch.manual_seed(0)
    return LLaVAModel(
        llm=dict(type='HFCausalLM', attn_implementation='sdpa', config=dict(
            model_type='llama', hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=128, vocab_size=300)),
        vision_encoder=dict(type='CLIPVisionEncoder', config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8)),
        trainable=['vision_encoder', 'projector', 'llm'],
        gradient_checkpointing=checkpointing).train()


def test_planned_policy_step_is_identical_to_full_checkpointing():
    """A step with 2 of 4 LLM layers checkpointed (and the tower) gives the same loss and
    gradients, bit for bit, as full checkpointing and as none."""
    from mllm.datasets.collate import flat_llava_collate
    g = torch.Generator().manual_seed(0)
    instances = []
    for n in (30, 20, 45):
        ids = torch.randint(3, 300, (n,), generator=g)
        ids[1:17] = -200  # one image: 16 tokens
        labels = ids.clone()
        labels[:max(17, n // 2)] = -100
        instances.append(dict(input_ids=ids, labels=labels,
                              pixel_values=torch.randn(3, 32, 32, generator=g)))
    batch = flat_llava_collate(instances)
    batch.pop('sample_rows'), batch.pop('num_tokens')
    results = []
    for policy in (dict(llm=2, vision=True), True, False):
        model = _tiny_llava(policy)
        flags = [layer.gradient_checkpointing for layer in model.llm.model.layers]
        loss = model(**batch, mode='loss')['loss']
        loss.backward()
        results.append((flags, loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == [True, True, False, False] and all(results[1][0])
    for _, loss, grads in results[1:]:
        assert torch.equal(loss, results[0][1])
        assert grads.keys() == results[0][2].keys()
        for name, grad in grads.items():
            assert torch.equal(grad, results[0][2][name]), name


def test_per_batch_policy_checkpoints_what_each_batch_needs_and_changes_no_value():
    """With ``per_batch`` each training micro-batch checkpoints the fewest layers its own
    tokens need within the room; loss and gradients are still those of full checkpointing,
    bit for bit."""
    from mllm.datasets.collate import flat_llava_collate
    from mllm.models.llms import layers_to_checkpoint
    g = torch.Generator().manual_seed(0)

    def batch_of(lengths):
        instances = []
        for n in lengths:
            ids = torch.randint(3, 300, (n,), generator=g)
            ids[1:17] = -200
            labels = ids.clone()
            labels[:17] = -100
            instances.append(dict(input_ids=ids, labels=labels,
                                  pixel_values=torch.randn(3, 32, 32, generator=g)))
        batch = flat_llava_collate(instances)
        batch.pop('sample_rows'), batch.pop('num_tokens')
        return batch
    short, long = batch_of([20, 24]), batch_of([60, 70, 80])  # 44 and 210 tokens
    # a kept layer 1000 B a token, a checkpointed one 100 B: 200 KB holds 4 kept layers of
    # 50 tokens; at 210 tokens even full checkpointing does not fit, and all 4 are
    per_batch = dict(room_gb=2e-4, kept=1000, checkpointed=100)
    assert [layers_to_checkpoint(t, 4, **per_batch) for t in (44, 210)] == [0, 4]
    assert layers_to_checkpoint(100, 4, **per_batch) == 3  # 100 x (3 x 100 + 1000) fits
    model = _tiny_llava(dict(llm=4, vision=False, per_batch=per_batch))
    full = _tiny_llava(True)
    for batch, expected in ((short, 0), (long, 4), (short, 0)):
        model.zero_grad(set_to_none=True), full.zero_grad(set_to_none=True)
        out = model(**batch, mode='loss')
        loss = out['loss']
        assert model.checkpointed_layers == expected == out['ckpt_layers'].item()  # logged
        assert [layer.gradient_checkpointing for layer in model.llm.model.layers] == [
            k < expected for k in range(4)]
        loss.backward()
        reference = full(**batch, mode='loss')['loss']
        reference.backward()
        assert torch.equal(loss, reference)
        for (name, p), q in zip(model.named_parameters(), full.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or torch.equal(p.grad, q.grad), name
    with torch.no_grad():  # evaluation leaves the flags alone
        model.eval()(**long, mode='loss')
    assert model.checkpointed_layers == 0


def test_per_batch_policy_rejects_a_malformed_budget():
    with pytest.raises(ValueError, match='per_batch must be dict'):
        _tiny_llava(dict(llm=2, per_batch=dict(room_gb=1.0, kept=10)))


def test_unresolved_auto_refuses_to_train():
    model = _tiny_llava('auto')
    with pytest.raises(RuntimeError, match="'auto' is resolved from the memory plan"):
        ids = torch.ones(1, 4, dtype=torch.long)
        model(input_ids=ids, labels=ids)


@pytest.mark.slow  # ~30 s: a real `mllm train` run
def test_train_resolves_auto_from_the_plan(tmp_path):
    """`mllm train` with gradient_checkpointing='auto' and a memory budget trains with the
    planned layers checkpointed, on padding-free batches with the token cache; the choice
    is in the run's own log file."""
    from mllm.datasets.synthetic import generate_synthetic_vqa
    data = generate_synthetic_vqa(str(tmp_path / 'data'), num_train=16, num_val=0)
    work_dir = tmp_path / 'run'
    assert main(['train', 'configs/tiny/tiny_llava_synthetic.py', '--work-dir', str(work_dir),
                 '--cfg-options', 'model.gradient_checkpointing=auto', 'gpu_mem_gb=0.06',
                 'train_dataloader.collate_fn.type=mllm.flat_llava_collate',
                 'llm.attn_implementation=sdpa',
                 f'train_dataloader.dataset.token_cache={tmp_path / "cache"}',
                 'train_dataloader.batch_size=8', 'train_cfg.max_iters=1',
                 'default_hooks.checkpoint.interval=2',
                 f'train_dataloader.dataset.data_path={data["train"]}',
                 f'train_dataloader.dataset.image_folder={data["image_folder"]}',
                 f'tokenizer.pretrained={data["tokenizer"]}']) == 0
    out = next(work_dir.glob('*/*.log')).read_text()
    assert ("gradient_checkpointing='auto': 1 of 2 LLM layers checkpointed, and the vision "
            'tower at the worst micro-batch (none') in out
    assert 'fewer for shorter micro-batches (per_batch)' in out  # lengths assumed here
    dumped = load_config(str(next(work_dir.glob('*.py'))))  # the config the run used
    policy = dumped.model.gradient_checkpointing
    assert (policy['llm'], policy['vision']) == (1, True)
    assert set(policy['per_batch']) == {'room_gb', 'kept', 'checkpointed'}
