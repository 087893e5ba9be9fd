"""``mllm bench gpu``: one device, LLaVA-1.5-7B shapes, mllm's step against XTuner's way.

Random weights (no download), bf16, one micro-batch of 16 samples whose lengths follow a
LLaVA-665K-like mix (``llava665k_like_lengths``: ~94 % with a 576-token image, multi-turn
VQA, conversations, detailed descriptions, ShareGPT text; an assumption, not the data),
grouped by length as XTuner's ``LengthGroupedSampler`` does. Forward + backward only (the
optimizer step is sharded under ZeRO and the same on both sides). Variants, each timed
over the same batches:

    xtuner_way      padded batch, logits over every position, every LLM layer and the
                    vision tower checkpointed: what XTuner's LLaVA configs run (XTuner
                    itself is not on the GPU image; ``mllm bench train`` runs it on CPU)
    mllm            padding-free batch, answer-only head and last layer, the planned
                    recompute (``mllm plan``'s layers for 8 x 80 GB under ZeRO-2)
    mllm_full_recompute / mllm_no_recompute   the same with every / no layer checkpointed
    mllm_micro_batch_8x2      the same global batch as 2 micro-batches of 8 (accumulated),
                              with the plan for micro-batch 8
    mllm_fused...             the same with the LLM's RMSNorms and SwiGLU compiled
                              (``fused_elementwise``) and the plan that counts it
    mllm_fused_per_batch      what the recipes train with: fused, and each batch
                              checkpoints the layers its own tokens need within the worst
                              batch's room (``per_batch``, what 'auto' resolves to):
                              the headline ratio (``mllm_step_over_xtuner``)
    mllm_flash_attention_2                    when flash-attn is installed

MFU is against the device's own bf16 matmul peak, measured first (``matmul_peak``); peak
memory is set beside the plan's estimate for one device (weights, gradients, activations
and logits; no optimizer state). A variant that fails (out of memory...) is recorded with
its error and the others still run. ``tiny=True`` runs the same code on the tiny config on
CPU in seconds (the tested path).
"""
import dataclasses
import statistics
import sys
import time
from typing import List, Optional

import torch

GB = 1e9
SAMPLES_PER_STEP = 16
RECIPES_VARIANT = 'mllm_fused_per_batch'  # the recipes' defaults: fused, 'auto' per batch


def llava665k_like_lengths(n: int, seed: int = 0, visual_tokens: int = 576,
                           max_length: int = 2048) -> List[dict]:
    """(tokens, learned, image) per sample, a LLaVA-1.5 665K-like mix (vicuna tokens: a
    ~45-token system prompt and template; ~1.3 tokens per word)."""
    import random
    rng = random.Random(f'llava665k-{seed}')
    out = []
    for _ in range(n):
        kind = rng.choices(('vqa', 'conversation', 'detail', 'text'), (0.55, 0.25, 0.14, 0.06))[0]
        if kind == 'vqa':  # VQAv2/GQA/OCR-VQA: several short Q/A turns on one image
            turns = [(rng.randint(12, 25), rng.randint(2, 6)) for _ in range(rng.randint(1, 10))]
        elif kind == 'conversation':
            turns = [(rng.randint(10, 30), rng.randint(20, 150)) for _ in range(rng.randint(1, 5))]
        elif kind == 'detail':
            turns = [(rng.randint(8, 15), rng.randint(80, 250))]
        else:  # ShareGPT
            turns = [(rng.randint(10, 200), rng.randint(50, 500)) for _ in range(rng.randint(1, 6))]
        image = kind != 'text'
        tokens = 45 + sum(q + a + 4 for q, a in turns) + (visual_tokens if image else 0)
        learned = sum(a + 1 for _, a in turns)
        tokens = min(tokens, max_length)
        out.append(dict(tokens=tokens, learned=min(learned, tokens - 45), image=image))
    return out


def matmul_peak(device, dtype=torch.bfloat16, size: int = 8192, seconds: float = 3.0) -> float:
    """The device's dense matmul FLOP/s, measured: the best of repeated size^3 products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = max(best, 10 * 2 * size ** 3 / (time.perf_counter() - t))
    return best


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def _instances(lengths: List[dict], visual: int, vocab: int, image_size: int, seed: int):
    """Token ids (image sentinels for the image run), labels on the answer tokens (the
    last ``learned`` positions, a stand-in for the turns' answers) and pixels."""
    from mllm.datasets.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, s in enumerate(lengths):
        ids = torch.randint(5, vocab, (s['tokens'],), generator=g)
        if s['image']:
            ids[1:1 + visual] = IMAGE_TOKEN_INDEX
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-s['learned']:] = ids[-s['learned']:]
        labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        out.append(dict(input_ids=ids, labels=labels, index=k,
                        pixel_values=torch.randn(3, image_size, image_size, generator=g)
                        if s['image'] else None))
    return out


def _to(batch: dict, device, dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if key in ('sample_rows', 'num_tokens', 'sample_ids'):
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype if value.is_floating_point() else None)
        out[key] = value
    return out


def _set_checkpointing(model, layers: int, vision: bool) -> None:
    from mllm.models.llms import enable_gradient_checkpointing
    enable_gradient_checkpointing(model.llm, layers)  # 0: every layer's flag cleared
    model.vision_encoder.set_grad_checkpointing(vision)


def bench_gpu(config: str = 'llava15_vicuna7b_finetune', device: Optional[str] = None,
              steps: int = 3, llm_layers: Optional[int] = None, tiny: bool = False,
              plan_gpus: int = 8, plan_gpu_mem_gb: float = 80.0, plan_stage: str = 'zero2',
              seed: int = 0, rounds: int = 2) -> dict:
    """The variants of the module doc on one device; see there.

    Args:
        config: the recipe whose model is built (random weights). Defaults to LLaVA-1.5-7B
            finetuning.
        device: defaults to 'cuda' when there is one, else 'cpu'.
        steps: timed steps per variant, after one warm-up step. Defaults to 3.
        llm_layers: keep only this many LLM layers (proportions kept otherwise), when the
            full depth does not fit the device. Defaults to the full depth.
        tiny: the tiny config on CPU in fp32: the kit's own test. Defaults to False.
        plan_gpus, plan_gpu_mem_gb, plan_stage: the run the planned recompute is for.
        rounds: passes over the variants, every other one in reverse order; a variant's
            step is its best round's, so that no variant pays for running first (the
            first H200 run timed the first two variants 0.6 s a step slower than the
            same work later). Defaults to 2.
    """
    import mllm.models  # noqa: F401
    from mllm.models.llms import fuse_elementwise
    from mllm.bench.memory import (Batch, Transformer, activation_gb, plan_memory,
                                   recompute_share)
    from mllm.engine.config import load_config
    from mllm.registry import MODELS, TRANSFORMS

    if tiny:
        config, device = 'configs/tiny/tiny_llava_synthetic.py', 'cpu'
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = str(device).startswith('cuda')
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = load_config(config)
    if llm_layers:
        cfg.llm['config']['num_hidden_layers'] = llm_layers
    model_cfg = cfg.model.copy()
    model_cfg.update(gradient_checkpointing=False, trainable=['projector', 'llm'])
    model_cfg['llm'] = dict(model_cfg['llm'], load_weights=False, pretrained=None,
                            torch_dtype='bfloat16' if cuda else 'float32',
                            attn_implementation='sdpa')
    model_cfg['vision_encoder'] = dict(model_cfg['vision_encoder'], load_weights=False,
                                       pretrained=None)
    model_cfg.pop('lora', None)
    result = dict(device=torch.cuda.get_device_name() if cuda else 'cpu', config=config,
                  dtype=str(dtype).split('.')[-1], samples_per_step=SAMPLES_PER_STEP,
                  variants={})
    start = time.perf_counter()
    result['matmul_peak_tflops'] = matmul_peak(device, dtype, 8192 if cuda else 256,
                                               3.0 if cuda else 0.2) / 1e12
    torch.manual_seed(seed)
    with torch.device(device):
        model = MODELS.build(model_cfg)
    model.to(device, dtype).train()
    result['build_s'] = time.perf_counter() - start
    processor = TRANSFORMS.build(cfg.image_processor)
    side = processor.size
    visual = model.num_visual_tokens((side, side))
    llm_cfg = model.llm.config
    max_length = cfg.train_dataloader.dataset.get('max_length', 2048)
    pool = llava665k_like_lengths(SAMPLES_PER_STEP * 64, seed, visual, max_length)
    if tiny:
        pool = [dict(s, tokens=min(s['tokens'], visual + 60), learned=min(s['learned'], 20))
                for s in pool]
    # length-grouped: micro-batches of similar length (XTuner's finetune sampler); the
    # batches at the 50th, 75th and 95th percentile of the grouped order
    pool.sort(key=lambda s: s['tokens'])
    groups = [pool[k:k + SAMPLES_PER_STEP] for k in range(0, len(pool), SAMPLES_PER_STEP)]
    picks = [groups[int(q * (len(groups) - 1))] for q in (0.5, 0.75, 0.95)][:max(1, steps)]
    batches = [_instances(g, visual, llm_cfg.vocab_size, side, seed + k)
               for k, g in enumerate(picks)]

    # the planned recompute: mllm plan's layers for the run the kit stands for, with these
    # lengths as the data (the worst micro-batch of the pool)
    import numpy as np
    lengths = dict(text=np.array([s['tokens'] - (visual if s['image'] else 0) for s in pool]),
                   images=np.array([int(s['image']) for s in pool]),
                   learned=np.array([s['learned'] for s in pool]), source='LLaVA-665K-like mix')
    def stage_plan(fused: bool, micro_batch: int) -> dict:
        """The plan's row for the run the kit stands for, with or without the compiled
        kernels (which count on CUDA, so in bf16), for SDPA as the model here runs."""
        plan_cfg = load_config(config, {'model.gradient_checkpointing': 'auto',
                                        'model.fused_elementwise': fused})
        if llm_layers:
            plan_cfg.llm['config']['num_hidden_layers'] = llm_layers
        plan_cfg.llm['attn_implementation'] = 'sdpa'
        plan = plan_memory(plan_cfg, gpus=plan_gpus, gpu_mem_gb=plan_gpu_mem_gb,
                           lengths=lengths, micro_batch=micro_batch,
                           precision='bf16' if cuda or fused else 'fp32')
        return dict(plan['stages'][plan_stage], lengths_from=plan['lengths_from'])

    # the same global batch as two micro-batches of 8 (gradient accumulation): half the
    # activations, so the plan checkpoints fewer layers
    half = SAMPLES_PER_STEP // 2
    planned, planned_half, planned_fused, planned_fused_half = (
        stage_plan(fused, mb) for fused in (False, True) for mb in (SAMPLES_PER_STEP, half))
    # what `mllm train` resolves 'auto' to: the worst batch's room, each batch its layers
    per_batch = planned_fused['per_batch']
    layers = llm_cfg.num_hidden_layers
    if tiny:  # the tiny model fits anything: plan half its layers, to exercise the path
        planned = planned_fused = dict(planned, checkpoint_layers=layers // 2)
        planned_half = planned_fused_half = dict(planned_half, checkpoint_layers=layers // 4)
    result['plan'] = dict(gpus=plan_gpus, gpu_mem_gb=plan_gpu_mem_gb, stage=plan_stage,
                          checkpoint_layers=planned['checkpoint_layers'], llm_layers=layers,
                          memory_gb=planned['memory_gb'], lengths_from=planned['lengths_from'],
                          micro_batch_8=dict(checkpoint_layers=planned_half['checkpoint_layers'],
                                             memory_gb=planned_half['memory_gb']),
                          fused=dict(checkpoint_layers=planned_fused['checkpoint_layers'],
                                     memory_gb=planned_fused['memory_gb']),
                          fused_micro_batch_8=dict(
                              checkpoint_layers=planned_fused_half['checkpoint_layers'],
                              memory_gb=planned_fused_half['memory_gb']))

    variants = [('xtuner_way', dict(flat=False, head=False, last=False, ckpt=layers, vision=True)),
                ('mllm', dict(flat=True, head=True, last=True,
                              ckpt=planned['checkpoint_layers'], vision=False)),
                ('mllm_full_recompute', dict(flat=True, head=True, last=True, ckpt=layers,
                                             vision=False)),
                ('mllm_no_recompute', dict(flat=True, head=True, last=True, ckpt=0,
                                           vision=False)),
                (f'mllm_micro_batch_{half}x2', dict(flat=True, head=True, last=True,
                                                    ckpt=planned_half['checkpoint_layers'],
                                                    vision=False, split=2)),
                ('mllm_fused', dict(flat=True, head=True, last=True, fused=True, vision=False,
                                    ckpt=planned_fused['checkpoint_layers'])),
                ('mllm_fused_per_batch', dict(flat=True, head=True, last=True, fused=True,
                                              vision=False, per_batch=per_batch,
                                              ckpt=planned_fused['checkpoint_layers'])),
                ('mllm_fused_no_recompute', dict(flat=True, head=True, last=True, fused=True,
                                                 ckpt=0, vision=False)),
                (f'mllm_fused_micro_batch_{half}x2', dict(
                    flat=True, head=True, last=True, fused=True, vision=False, split=2,
                    ckpt=planned_fused_half['checkpoint_layers']))]
    try:
        import flash_attn  # noqa: F401
        variants.append(('mllm_flash_attention_2', dict(
            flat=True, head=True, last=True, ckpt=planned['checkpoint_layers'], vision=False,
            attn='flash_attention_2')))
        result['flash_attention_2'] = 'installed'
    except ImportError:
        result['flash_attention_2'] = 'not installed (no prebuilt wheel within the carry limit)'

    llm_params = sum(p.numel() for p in model.llm.parameters())
    block_params = (llm_params - 2 * llm_cfg.vocab_size * llm_cfg.hidden_size) // layers
    tower = Transformer(layers=layers, hidden=llm_cfg.hidden_size,
                        heads=llm_cfg.num_attention_heads, flash=True,
                        params_per_layer=block_params,
                        intermediate=llm_cfg.intermediate_size,
                        kv_heads=getattr(llm_cfg, 'num_key_value_heads', 0) or 0)
    head_of = model._decoder_and_head
    rows = {name: dict(checkpoint_layers=v['ckpt'], padding_free=v['flat'],
                       answer_only_head=v['head'], answer_only_last_layer=v['last'],
                       attn=v.get('attn', 'sdpa'), micro_batches=v.get('split', 1),
                       round_step_s=[])
            for name, v in variants}
    best = {}
    for r in range(max(1, rounds)):
        for name, v in variants if r % 2 == 0 else variants[::-1]:
            row = rows[name]
            if 'error' in row:
                continue
            try:
                _set_checkpointing(model, v['ckpt'], v['vision'])
                fuse_elementwise(model.llm, v.get('fused', False))
                model.per_batch_checkpointing = v.get('per_batch')
                model.answer_only_last_layer = v['last']
                model._decoder_and_head = head_of if v['head'] else (lambda: None)
                model.llm.set_attn_implementation(v.get('attn', 'sdpa'))
                seconds, losses, peak, layers_seen = _time_variant(model, batches, v, device,
                                                                   dtype)
                if v.get('per_batch'):
                    row['checkpoint_layers_per_batch'] = layers_seen
                row['round_step_s'].append(statistics.mean(seconds))
                if name not in best or sum(seconds) < sum(best[name][0]):
                    best[name] = (seconds, losses)
                if peak is not None:
                    row['peak_memory_gb'] = max(row.get('peak_memory_gb', 0.0), peak)
                print(f'bench gpu: round {r + 1} {name}: {statistics.mean(seconds):.3f} s a step, '
                      f'peak {peak or 0:.1f} GB, losses {losses}', file=sys.stderr, flush=True)
            except Exception as err:  # noqa: BLE001 - a failing variant is a finding, not a stop
                row['error'] = f'{type(err).__name__}: {str(err)[:300]}'
                print(f'bench gpu: round {r + 1} {name}: {row["error"]}', file=sys.stderr,
                      flush=True)
            if cuda:
                torch.cuda.empty_cache()
    real = [sum(s['tokens'] for s in g) for g in picks]
    learned = [sum(s['learned'] for s in g) for g in picks]
    flops = [_train_flops(llm_params, layers, llm_cfg.hidden_size, g) for g in picks]
    worst = max(range(len(picks)), key=lambda k: real[k])
    width = 2 if cuda else 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for name, v in variants:
        row = rows[name]
        if name in best:
            seconds, losses = best[name]
            step = sum(seconds)
            row.update(step_s=statistics.mean(seconds), tokens_per_s=sum(real) / step,
                       model_tflops=sum(flops) / step / 1e12,
                       mfu=sum(flops) / step / (result['matmul_peak_tflops'] * 1e12),
                       losses=losses)
        # the plan for this device and variant: weights + gradients + activations + logits
        # of its largest micro-batch
        split = v.get('split', 1)
        micro = SAMPLES_PER_STEP // split
        group = sorted(picks[worst], key=lambda s: s['tokens'])[-micro:]
        longest = max(s['tokens'] for s in group)
        tokens = sum(s['tokens'] for s in group) if v['flat'] else micro * longest
        answers = sum(s['learned'] for s in group) if v['head'] else tokens
        batch = Batch(micro, tokens, longest, answers, micro, '')
        # per-batch: the layers the policy chose for that batch, not the worst data batch's
        ckpt = (row['checkpoint_layers_per_batch'][worst]
                if row.get('checkpoint_layers_per_batch') else v['ckpt'])
        row['recompute_share'] = recompute_share(tower, batch, ckpt, True)
        parts = activation_gb(dataclasses.replace(tower, fused=v.get('fused', False)),
                              llm_cfg.vocab_size, batch, ckpt,
                              answer_only_head=True, precision='bf16' if cuda else 'fp32')
        row['plan_memory_gb'] = (width * (total + trainable)) / GB + sum(parts.values())
        result['variants'][name] = row
    model._decoder_and_head = head_of
    for row in result['variants'].values():
        if 'step_s' in row and 'step_s' in result['variants']['xtuner_way']:
            row['over_xtuner'] = row['step_s'] / result['variants']['xtuner_way']['step_s']
    # the headline is what the recipes train with
    result['recipes_variant'] = RECIPES_VARIANT
    ours = result['variants'].get(RECIPES_VARIANT, {})
    theirs = result['variants'].get('xtuner_way', {})
    if 'step_s' in ours and 'step_s' in theirs:
        result['mllm_step_over_xtuner'] = ours['step_s'] / theirs['step_s']
        result['goal_met'] = result['mllm_step_over_xtuner'] <= 0.75
    result['total_s'] = time.perf_counter() - start
    return result


def _time_variant(model, batches: List[list], v: dict, device, dtype):
    """Forward + backward of each batch (split into ``v['split']`` micro-batches whose
    losses are weighted by their answer tokens, which gives the whole batch's mean), after
    one untimed step; returns the seconds and losses per batch and the peak memory (GB)."""
    from mllm.datasets.collate import flat_llava_collate, llava_collate
    from mllm.datasets.templates import IGNORE_INDEX
    collate = flat_llava_collate if v['flat'] else llava_collate
    split = v.get('split', 1)
    steps = []
    for instances in batches:
        size = len(instances) // split
        chunks = [instances[k * size:(k + 1) * size if k < split - 1 else None]
                  for k in range(split)]
        answers = [sum(int((i['labels'][1:] != IGNORE_INDEX).sum()) for i in c) for c in chunks]
        steps.append([(_to(collate(c), device, dtype), a / sum(answers))
                      for c, a in zip(chunks, answers)])
    cuda = str(device).startswith('cuda')
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses, layers_seen = [], [], []
    for k in range(len(steps) + 1):  # step 0 warms up on the first batch
        _sync(device)
        t = time.perf_counter()
        total = 0.0
        for batch, weight in steps[max(k - 1, 0)]:
            loss = model(**batch, mode='loss')['loss']
            (loss * weight if split > 1 else loss).backward()
            total += loss.item() * weight
        _sync(device)
        seconds.append(time.perf_counter() - t)
        losses.append(total)
        layers_seen.append(model.checkpointed_layers)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / GB if cuda else None
    return seconds[1:], losses[1:], peak, layers_seen[1:]


def _train_flops(llm_params: int, layers: int, hidden: int, group: List[dict]) -> float:
    """Model FLOPs of forward + backward over the real tokens (no recompute, as MFU
    counts): 6 x LLM parameters per token plus causal attention scores per sample."""
    return sum(6 * llm_params * s['tokens'] + 6 * layers * hidden * s['tokens'] ** 2
               for s in group)
