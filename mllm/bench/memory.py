"""Per-GPU memory of a training config under each DeepSpeed ZeRO stage, and the recompute
policy (how many layers to checkpoint) that fits it.

Model states (ZeRO paper, Rajbhandari et al. 2020), with Ψ all parameters, Ψt the trainable
ones and N GPUs; bf16 mixed precision keeps bf16 weights (2 B), bf16 gradients (2 B) and
an AdamW state of fp32 master weights + two fp32 moments (12 B); frozen parameters have
neither gradients nor optimizer state. In fp32 (CPU training) weights and gradients take
4 B and AdamW's two moments 8 B (no master copy).

    stage          weights    gradients   optimizer
    zero1          2Ψ         2Ψt         12Ψt / N
    zero2          2Ψ         2Ψt / N     12Ψt / N
    zero3          2Ψ / N     2Ψt / N     12Ψt / N      + gathered working set
    zero3_offload  (CPU)      (CPU)       (CPU)         + gathered working set

ZeRO-3 gathers the weights of the block it runs (and prefetches the next): the working set
is counted as two copies of the largest of one LLM block or the embedding matrix.

Activations of one transformer block, 16-bit, no tensor parallelism, with T the tokens of
one micro-batch, s the longest sample, h the hidden size, i the MLP width, a the heads,
d = h / a the head width and kv the key/value width (a·d, less with grouped-query
attention). They are the bytes autograd saves in transformers' own layers, counted tensor
by tensor (``tests/test_plan.py`` counts them again in ``LlamaDecoderLayer`` and
``CLIPEncoderLayer``); on an H200, a 7B layer kept 4 % less than this (docs/performance.md).

    Llama-family decoder layer (SDPA):  (20·h + 8·i + 4·kv + 4·d + 4·a + 8)·T bytes
        two RMSNorms each keep an fp32 copy (8h), q / attention output / o_proj and MLP
        inputs (12h), k and v (4kv), RoPE's cos and sin (4d), SDPA's fp32 log-sum-exp (4a),
        SwiGLU's gate, up, SiLU and product (8i)
    the same, fused_elementwise:         (12·h + 4·i + 4·kv + 4·d + 4·a + 8)·T bytes
        each compiled RMSNorm keeps its bf16 input instead of the two copies, the compiled
        SwiGLU recomputes SiLU in the backward and the product for down_proj's (gate and
        up kept, 4i)
    CLIP-style encoder layer (SDPA):    (16·h + 6·i + 4·a + 8)·T bytes
    a block without a known MLP width:  34·T·h (Korthikanti et al. 2022)
    eager attention adds 5·a·s·T bytes (the s×s scores, softmax and dropout mask)

For vicuna-7B the Llama formula gives 45.7·T·h, a third more than Korthikanti's 34·T·h,
which assumes a 4h GELU MLP and no fp32 norm copies.

T is what the collate function makes of the micro-batch: the sum of its samples' lengths
for padding-free batches (``flat_llava_collate``, the recipes' default), micro-batch x the
longest for padded ones. Which micro-batch: the worst one the data can form, i.e. the
``micro_batch`` longest samples (a length-grouped sampler puts them together), read from
the token cache (``lengths``); without data, every sample is ``max_length`` long.

A checkpointed block keeps only its input (2·T·h bytes); while one is recomputed its full
activations are live again (one block), which raises the peak only when every block
is checkpointed: the first K are, and the backward frees the others before it gets there. The LM head's logits take 10 bytes per
position and vocabulary entry (bf16 logits, their fp32 copy, log-softmax's output), over
the positions with a learned label only for the answer-only head (``LLaVAModel`` with a
Llama-family LLM), over every position otherwise. A trainable vision tower adds the block
formula over its tokens (checkpointed whole or not at all); a frozen one stores nothing.
A fixed ``CUDA_OVERHEAD_GB`` covers the CUDA context, NCCL buffers and fragmentation.
fp32 doubles every activation term.

The recompute policy (``gradient_checkpointing='auto'``): per stage, the fewest checkpointed
layers whose total fits the GPU, choosing between checkpointing the trainable vision tower
or not by the recompute FLOPs; the recompute share is the recomputed forward FLOPs over the
step's FLOPs without recompute (forward + backward: 3x the forward when the LLM trains,
2x when only its inputs need gradients). Full checkpointing of a training LLM costs ~1/3.
"""
from dataclasses import dataclass
from typing import Dict, Optional

GB = 1e9
# CUDA context (~0.5-1 GB), NCCL/DeepSpeed communication buckets and fragmentation
CUDA_OVERHEAD_GB = 3.0
STAGES = ('zero1', 'zero2', 'zero3', 'zero3_offload')
# bytes per parameter: (weights, gradients, optimizer state) by precision
STATE_BYTES = {'bf16': (2, 2, 12), 'fp32': (4, 4, 8)}
LOGIT_BYTES = 10  # per position and vocabulary entry: bf16 logits + fp32 copy + log-softmax
# collate functions whose micro-batch holds only real tokens
FLAT_COLLATES = ('flat_llava_collate', 'packed_llava_collate')
# the parts of one stage's per-GPU total, in the order `mllm plan` prints them
PARTS = ('weights', 'gradients', 'optimizer', 'working_set', 'activations_gb', 'logits_gb',
         'overhead_gb')


@dataclass
class Transformer:
    """What the activation formula needs of one tower."""
    layers: int
    hidden: int
    heads: int
    flash: bool
    params_per_layer: int = 0  # for the recompute FLOPs (2 x params per token)
    intermediate: int = 0  # MLP width; 0: the generic block (34 h bytes per token)
    kv_heads: int = 0  # grouped-query attention; 0: as many as ``heads``
    gated: bool = True  # a Llama-family decoder layer (SwiGLU); False: a CLIP-style one
    fused: bool = False  # RMSNorm and SwiGLU compiled (``LLaVAModel(fused_elementwise=True)``)


def block_bytes_per_token(t: Transformer) -> float:
    """16-bit activations one block keeps per token for its backward (module doc): what
    autograd saves in transformers' own layers, counted by ``tests/test_plan.py``."""
    h = t.hidden
    if not t.intermediate:
        return 34 * h
    head_dim = h // t.heads
    if t.gated:
        kv = (t.kv_heads or t.heads) * head_dim
        norms_and_mlp = 12 * h + 4 * t.intermediate if t.fused else 20 * h + 8 * t.intermediate
        return norms_and_mlp + 4 * kv + 4 * head_dim + 4 * t.heads + 8
    return 16 * h + 6 * t.intermediate + 4 * t.heads + 8


def block_activation_bytes(t: Transformer, tokens: int, longest: int) -> float:
    """16-bit activations of one block over ``tokens`` tokens (see module doc)."""
    per = block_bytes_per_token(t) * tokens
    return per if t.flash else per + 5 * t.heads * longest * tokens


def tower_activation_bytes(t: Transformer, tokens: int, longest: int,
                           checkpoint_layers: int) -> float:
    """Peak of a tower whose first ``checkpoint_layers`` blocks are checkpointed: their
    inputs plus the other blocks' activations at the end of the forward. The backward
    frees those (the last blocks go first) before it recomputes a checkpointed block, so
    the recompute adds to the peak only when every block is checkpointed."""
    if not 0 <= checkpoint_layers <= t.layers:
        raise ValueError(f'checkpoint_layers must be in [0, {t.layers}], got {checkpoint_layers}')
    block = block_activation_bytes(t, tokens, longest)
    kept = 2 * tokens * t.hidden * checkpoint_layers + block * (t.layers - checkpoint_layers)
    return kept + (block if checkpoint_layers == t.layers else 0)


def model_state_gb(stage: str, params: int, trainable: int, gpus: int,
                   working_set: int, precision: str = 'bf16') -> Dict[str, float]:
    """Weights, gradients, optimizer state and ZeRO-3 working set on one GPU (GB)."""
    if gpus < 1:
        raise ValueError(f'gpus must be at least 1, got {gpus}')
    w, g, o = STATE_BYTES[precision]
    n = {'none': (1, 1, 1), 'zero1': (1, 1, gpus), 'zero2': (1, gpus, gpus),
         'zero3': (gpus, gpus, gpus)}.get(stage)
    if stage == 'zero3_offload':
        return dict(weights=0.0, gradients=0.0, optimizer=0.0,
                    working_set=2 * w * working_set / GB)
    if n is None:
        raise ValueError(f'unknown stage {stage!r}; expected none or one of {STAGES}')
    return dict(weights=w * params / n[0] / GB, gradients=g * trainable / n[1] / GB,
                optimizer=o * trainable / n[2] / GB,
                working_set=2 * w * working_set / GB if stage == 'zero3' else 0.0)


@dataclass
class Batch:
    """The worst micro-batch one GPU runs: ``tokens`` through the LLM (padding included),
    ``longest`` sample, ``learned`` positions (answer tokens), ``images`` and where the
    figures came from."""
    micro_batch: int
    tokens: int
    longest: int
    learned: int
    images: int
    source: str


def worst_batch(micro_batch: int, max_length: int, visual_tokens: int, flat: bool,
                lengths: Optional[dict] = None, seq_len: Optional[int] = None) -> Batch:
    """The micro-batch of the ``micro_batch`` longest samples (see the module doc).

    Args:
        lengths: per-sample arrays ``text`` (tokens without the image sentinel), ``images``
            (0/1) and ``learned`` (``mllm.datasets.token_cache.sample_lengths``), and optionally
            ``source``, where they come from (default 'token cache'); None: every sample
            ``max_length`` long with an image and all its text learned.
        seq_len: every sample exactly this long (``mllm plan --seq-len``).
    """
    if seq_len is not None or lengths is None:
        s = seq_len or max_length
        return Batch(micro_batch, micro_batch * s, s, micro_batch * max(s - visual_tokens, 1),
                     micro_batch, f'{s} tokens per sample (assumed)')
    import numpy as np
    full = sample_tokens(lengths, visual_tokens, max_length)
    if len(full) < micro_batch:
        micro_batch = len(full)
    top = np.sort(full)[::-1][:micro_batch]
    learned = np.sort(np.minimum(np.asarray(lengths['learned']), full))[::-1][:micro_batch]
    longest = int(top[0])
    tokens = int(top.sum()) if flat else micro_batch * longest
    images = int(np.sort(np.asarray(lengths['images']))[::-1][:micro_batch].sum())
    return Batch(micro_batch, tokens, longest, int(learned.sum()), images,
                 f"{len(full)} samples ({lengths.get('source', 'token cache')}): the "
                 f'{micro_batch} longest, '
                 f'median {int(np.median(full))}, longest {longest} tokens')


def sample_tokens(lengths: dict, visual_tokens: int, max_length: int):
    """Each sample's tokens in the LLM (text, plus the visual tokens of its image),
    truncated to ``max_length``: a numpy array."""
    import numpy as np
    return np.minimum(np.asarray(lengths['text']) + np.asarray(lengths['images']) * visual_tokens,
                      max_length)


def llm_bytes_per_token(llm: Transformer, precision: str = 'bf16') -> Dict[str, float]:
    """Bytes per token of a kept LLM layer and of a checkpointed one's input: the
    ``kept`` and ``checkpointed`` of ``LLaVAModel(gradient_checkpointing=dict(per_batch=
    ...))``. Activations are counted in 16-bit; fp32 doubles them."""
    scale = 2 if precision == 'fp32' else 1
    return dict(kept=scale * block_bytes_per_token(llm), checkpointed=scale * 2 * llm.hidden)


def activation_gb(llm: Transformer, vocab: int, batch: Batch, llm_checkpoint: int,
                  vision: Optional[Transformer] = None, vision_tokens: int = 0,
                  vision_checkpoint: bool = False, answer_only_head: bool = True,
                  precision: str = 'bf16') -> Dict[str, float]:
    """Activations (LLM and trainable vision tower) and logits kept for backward on one GPU
    (GB); ``vision`` only when it trains."""
    scale = 2 if precision == 'fp32' else 1
    acts = tower_activation_bytes(llm, batch.tokens, batch.longest, llm_checkpoint)
    if vision is not None and batch.images:
        acts += tower_activation_bytes(vision, vision_tokens * batch.images, vision_tokens,
                                       vision.layers if vision_checkpoint else 0)
    positions = batch.learned if answer_only_head else batch.tokens
    return dict(activations_gb=scale * acts / GB,
                logits_gb=scale * LOGIT_BYTES * positions * vocab / GB)


def recompute_share(llm: Transformer, batch: Batch, llm_checkpoint: int, llm_trains: bool,
                    vision: Optional[Transformer] = None, vision_tokens: int = 0,
                    vision_checkpoint: bool = False, vocab: int = 0) -> float:
    """Recomputed forward FLOPs over the step's FLOPs without recompute (module doc)."""
    llm_layer = 2 * llm.params_per_layer * batch.tokens
    forward = llm_layer * llm.layers + 2 * llm.hidden * vocab * batch.learned
    recompute = llm_layer * llm_checkpoint
    step = forward * (3 if llm_trains else 2)
    if vision is not None and batch.images:
        vision_forward = 2 * vision.params_per_layer * vision_tokens * batch.images * vision.layers
        step += 3 * vision_forward
        recompute += vision_forward if vision_checkpoint else 0
    return recompute / step if step else 0.0


def plan_policy(budget_gb: float, llm: Transformer, vocab: int, batch: Batch, llm_trains: bool,
                vision: Optional[Transformer] = None, vision_tokens: int = 0,
                answer_only_head: bool = True, precision: str = 'bf16') -> dict:
    """The fewest checkpointed LLM layers (and whether the trainable vision tower
    checkpoints) whose activations and logits fit ``budget_gb``, with the least recompute;
    full checkpointing (``fits`` False) when nothing fits."""
    options = []
    for vision_ckpt in ((False, True) if vision is not None and batch.images else (False,)):
        for k in range(llm.layers + 1):
            mem = activation_gb(llm, vocab, batch, k, vision, vision_tokens, vision_ckpt,
                                answer_only_head, precision)
            if sum(mem.values()) <= budget_gb:
                share = recompute_share(llm, batch, k, llm_trains, vision, vision_tokens,
                                        vision_ckpt, vocab)
                options.append((share, k, vision_ckpt, mem))
                break
    if options:
        share, k, vision_ckpt, mem = min(options, key=lambda o: (o[0], o[1]))
        return dict(checkpoint_layers=k, checkpoint_vision=vision_ckpt, fits=True,
                    recompute_share=share, **mem)
    vision_ckpt = vision is not None and bool(batch.images)
    mem = activation_gb(llm, vocab, batch, llm.layers, vision, vision_tokens, vision_ckpt,
                        answer_only_head, precision)
    return dict(checkpoint_layers=llm.layers, checkpoint_vision=vision_ckpt, fits=False,
                recompute_share=recompute_share(llm, batch, llm.layers, llm_trains, vision,
                                                vision_tokens, vision_ckpt, vocab), **mem)


def _transformer(config: dict, attn_implementation: Optional[str],
                 params_per_layer: int = 0, gated: bool = True,
                 fused: bool = False) -> Optional[Transformer]:
    keys = ('num_hidden_layers', 'hidden_size', 'num_attention_heads')
    if not all(k in config for k in keys):
        return None  # e.g. ConvNeXt towers: no block formula
    return Transformer(layers=config['num_hidden_layers'], hidden=config['hidden_size'],
                       heads=config['num_attention_heads'],
                       flash=(attn_implementation or 'sdpa') != 'eager',
                       params_per_layer=params_per_layer,
                       intermediate=config.get('intermediate_size', 0),
                       kv_heads=config.get('num_key_value_heads') or 0, gated=gated,
                       fused=fused)


def _llm_block_params(report: dict, llm: dict) -> int:
    c = llm['config']
    embed = c['vocab_size'] * c['hidden_size']
    untied = 1 if c.get('tie_word_embeddings') else 2
    return int((report['params']['llm'] - untied * embed) / c['num_hidden_layers'])


def _llm_working_set(report: dict, llm: dict) -> int:
    """Largest gathered unit under ZeRO-3: one LLM block or the embedding matrix."""
    c = llm['config']
    return int(max(_llm_block_params(report, llm), c['vocab_size'] * c['hidden_size']))


def _fixed_policy(value, llm: Transformer, vision: Optional[Transformer]):
    """(LLM layers, vision) of a config's explicit ``gradient_checkpointing``."""
    from mllm.models.llms import checkpointing_policy
    layers, vision_ckpt = checkpointing_policy(value)
    layers = llm.layers if layers is None else (0 if layers is False else layers)
    return min(layers, llm.layers), bool(vision_ckpt and vision is not None)


def _answer_only_head(cfg) -> bool:
    from mllm.models.llava import PLAIN_HEAD_LLMS
    return cfg.llm['config'].get('model_type') in PLAIN_HEAD_LLMS


def _collate_is_flat(cfg) -> bool:
    collate = (cfg.train_dataloader.get('collate_fn') or {}).get('type', '')
    return str(collate).split('.')[-1] in FLAT_COLLATES


def plan_memory(cfg, gpus: int = 8, gpu_mem_gb: float = 80.0, precision: str = 'bf16',
                seq_len: Optional[int] = None, report: Optional[dict] = None,
                overhead_gb: float = CUDA_OVERHEAD_GB, lengths: Optional[dict] = None,
                micro_batch: Optional[int] = None) -> dict:
    """The ``mllm plan`` report for a loaded config.

    Args:
        cfg: a loaded (bound) config.
        gpus: data-parallel GPUs (ZeRO shards over all of them). Defaults to 8.
        gpu_mem_gb: memory of one GPU. Defaults to 80.
        precision: 'bf16' (DeepSpeed mixed precision) or 'fp32'. Defaults to 'bf16'.
        seq_len: every sample this many tokens; defaults to ``lengths`` or else the
            dataset's ``max_length``.
        report: ``inspect_config``'s report (built on the meta device when None).
        overhead_gb: fixed per-GPU overhead. Defaults to ``CUDA_OVERHEAD_GB``.
        lengths: the data's real lengths (``token_cache.sample_lengths``). Defaults to None.
        micro_batch: samples per GPU step. Defaults to the config's ``batch_size``.
    """
    if gpus < 1:
        raise ValueError(f'gpus must be at least 1, got {gpus}')
    if gpu_mem_gb <= 0:
        raise ValueError(f'gpu memory must be positive, got {gpu_mem_gb} GB')
    if report is None:
        from mllm.bench.inspect import inspect_config
        report = inspect_config(cfg)
    loader = cfg.train_dataloader
    max_length = loader.dataset.get('max_length', 2048)
    micro_batch = micro_batch or loader.batch_size
    trainable = set(cfg.model.get('trainable', ()))
    llm = _transformer(cfg.llm['config'], cfg.llm.get('attn_implementation'),
                       _llm_block_params(report, cfg.llm),
                       # the compiled kernels run on CUDA only (bf16 runs here)
                       fused=bool(cfg.model.get('fused_elementwise')) and precision != 'fp32')
    scale = 2 if precision == 'fp32' else 1  # activations are counted in 16-bit
    bytes_per_token = llm_bytes_per_token(llm, precision)
    llm_trains = any(t == 'llm' or t.startswith('llm.') for t in trainable) or bool(
        cfg.model.get('lora'))
    vision = None
    if 'vision_encoder' in trainable:
        vcfg = cfg.vision_encoder.get('config', {})
        if 'hidden_size' in vcfg and 'intermediate_size' in vcfg:
            per_layer = 4 * vcfg['hidden_size'] ** 2 + 2 * vcfg['hidden_size'] * vcfg[
                'intermediate_size']
            vision = _transformer(vcfg, 'eager', per_layer, gated=False)
    vision_tokens = report['visual_tokens'] + 1  # CLS included
    batch = worst_batch(micro_batch, max_length, report['visual_tokens'],
                        _collate_is_flat(cfg), lengths, seq_len)
    median_sample_tokens = None
    if lengths is not None and seq_len is None:
        import numpy as np
        median_sample_tokens = int(np.median(
            sample_tokens(lengths, report['visual_tokens'], max_length)))
    vocab = cfg.llm['config']['vocab_size']
    head = _answer_only_head(cfg)
    setting = cfg.model.get('gradient_checkpointing', False)
    common = dict(vision=vision, vision_tokens=vision_tokens, answer_only_head=head,
                  precision=precision)
    full = activation_gb(llm, vocab, batch, llm.layers, vision_checkpoint=True, **common)
    none = activation_gb(llm, vocab, batch, 0, vision_checkpoint=False, **common)
    working = _llm_working_set(report, cfg.llm)
    stages = {}
    for stage in STAGES:
        states = model_state_gb(stage, report['params']['total'], report['trainable_params'],
                                gpus, working, precision)
        base = sum(states.values()) + overhead_gb
        if setting == 'auto':
            policy = plan_policy(gpu_mem_gb - base, llm, vocab, batch, llm_trains, **common)
        else:
            k, vision_ckpt = _fixed_policy(setting, llm, vision)
            mem = activation_gb(llm, vocab, batch, k, vision_checkpoint=vision_ckpt, **common)
            policy = dict(checkpoint_layers=k, checkpoint_vision=vision_ckpt,
                          recompute_share=recompute_share(llm, batch, k, llm_trains, vision,
                                                          vision_tokens, vision_ckpt, vocab),
                          **mem)
        row = {k: round(v, 2) for k, v in states.items()}
        row.update(activations_gb=round(policy['activations_gb'], 2),
                   logits_gb=round(policy['logits_gb'], 2), overhead_gb=round(overhead_gb, 2))
        # the total is the sum of the printed parts, so the table adds up
        memory = round(sum(row[p] for p in PARTS), 2)
        if setting == 'auto' and llm.flash:
            # the room the LLM's activations may take in any micro-batch: what the worst
            # one leaves of the GPU after states, overhead, its logits and the vision tower
            llm_acts = scale * tower_activation_bytes(
                llm, batch.tokens, batch.longest, policy['checkpoint_layers']) / GB
            room = round(
                gpu_mem_gb - base - policy['logits_gb'] - (policy['activations_gb'] - llm_acts), 3)
            if room > 0:  # what `LLaVAModel(gradient_checkpointing=dict(per_batch=...))` takes
                row['per_batch'] = dict(room_gb=room, **bytes_per_token)
        row.update(memory_gb=memory, fits=memory <= gpu_mem_gb, micro_batch=batch.micro_batch,
                   checkpoint_layers=policy['checkpoint_layers'],
                   checkpoint_vision=policy['checkpoint_vision'],
                   recompute_share=round(policy['recompute_share'], 4),
                   memory_gb_with_checkpointing=round(base + sum(full.values()), 2),
                   memory_gb_without_checkpointing=round(base + sum(none.values()), 2))
        stages[stage] = row
    offload = STATE_BYTES[precision]
    cheapest = next((s for s in STAGES if stages[s]['fits']), None)
    return dict(stages=stages, cheapest=cheapest, recommended=recommend(stages), gpus=gpus,
                gpu_mem_gb=gpu_mem_gb, precision=precision, seq_len=batch.longest,
                batch_per_gpu=batch.micro_batch, tokens_per_micro_batch=batch.tokens,
                learned_per_micro_batch=batch.learned, lengths_from=batch.source,
                padding_free=_collate_is_flat(cfg), answer_only_head=head,
                gradient_checkpointing=setting, llm_layers=llm.layers,
                median_sample_tokens=median_sample_tokens,
                llm_bytes_per_token=bytes_per_token,
                overhead_gb=overhead_gb,
                params=report['params']['total'], trainable_params=report['trainable_params'],
                visual_tokens=report['visual_tokens'],
                offload_cpu_gb=round(sum(
                    b * n for b, n in zip(offload, (report['params']['total'],
                                                    report['trainable_params'],
                                                    report['trainable_params']))) / GB, 1))


def recommend(stages: Dict[str, dict]) -> Optional[str]:
    """The stage to train with: of ZeRO-1 and ZeRO-2 (the data-parallel communication
    volume, ZeRO paper §7), the one that fits with the least recompute (ZeRO-1 on a tie);
    else ZeRO-3 (1.5x the communication), else ZeRO-3 with CPU offload; None if none fits."""
    for group in (('zero1', 'zero2'), ('zero3',), ('zero3_offload',)):
        fitting = [s for s in group if stages[s]['fits']]
        if fitting:
            return min(fitting, key=lambda s: (stages[s]['recompute_share'], group.index(s)))
    return None


# ----------------------------------------------------------------- 'auto' at train time
def run_setup(cfg) -> tuple:
    """(ZeRO stage, precision) of a config after ``use_deepspeed``: ('none', ...) without
    DeepSpeed; precision 'bf16' when its JSON (or, without DeepSpeed, CUDA) says so."""
    import torch
    strategy = cfg.get('strategy') or {}
    if strategy.get('type') != 'DeepSpeedStrategy':
        return 'none', 'bf16' if torch.cuda.is_available() else 'fp32'
    ds = strategy.get('config') or {}
    zero = ds.get('zero_optimization') or {}
    stage = int(zero.get('stage', 0))
    offload = zero.get('offload_optimizer') or zero.get('offload_param')
    name = 'zero3_offload' if stage == 3 and offload else f'zero{stage}' if stage else 'none'
    half = (ds.get('bf16') or {}).get('enabled') or (ds.get('fp16') or {}).get('enabled')
    return name, 'bf16' if half else 'fp32'


def data_lengths(cfg) -> Optional[dict]:
    """The data's lengths from its token cache when the cache exists (it is built on the
    dataset's first use, so a second run plans with real lengths); None otherwise."""
    import os
    dataset = cfg.train_dataloader.dataset
    cache_dir, data_path = dataset.get('token_cache'), dataset.get('data_path')
    if not cache_dir or not data_path or not os.path.isdir(cache_dir) \
            or not os.path.exists(data_path):
        return None
    from mllm.datasets.templates import get_template
    from mllm.datasets.token_cache import TokenCache, cache_key, sample_lengths
    from mllm.datasets.tokenizers import build_tokenizer
    tokenizer = build_tokenizer(dataset.tokenizer)
    folder = os.path.join(cache_dir, cache_key(data_path, tokenizer,
                                               get_template(dataset.template)))
    return sample_lengths(TokenCache(folder)) if os.path.isdir(folder) else None


def resolve_auto_checkpointing(cfg, gpus: Optional[int] = None,
                               gpu_mem_gb: Optional[float] = None, logger=None) -> Optional[dict]:
    """Replace ``model.gradient_checkpointing='auto'`` by the plan's policy for this run:
    its GPUs (WORLD_SIZE), the memory of its GPU (or ``cfg.gpu_mem_gb``), its ZeRO stage,
    micro-batch and the data's lengths. Returns the stage's plan row (None if not 'auto').

    On a machine without CUDA and no ``gpu_mem_gb`` there is no device memory to plan for:
    no layer is checkpointed, and that is logged.
    """
    import os

    import torch
    if cfg.model.get('gradient_checkpointing') != 'auto':
        return None
    gpus = gpus or int(os.environ.get('WORLD_SIZE', 1))
    gpu_mem_gb = gpu_mem_gb or cfg.get('gpu_mem_gb')
    log = logger or (lambda msg: print(msg))
    if gpu_mem_gb is None and torch.cuda.is_available():
        gpu_mem_gb = torch.cuda.get_device_properties(
            int(os.environ.get('LOCAL_RANK', 0))).total_memory / GB
    if gpu_mem_gb is None:
        cfg.model.gradient_checkpointing = dict(llm=0, vision=False)
        log("gradient_checkpointing='auto': no CUDA device and no gpu_mem_gb in the config, "
            'so no layer is checkpointed')
        return None
    stage, precision = run_setup(cfg)
    lengths = data_lengths(cfg)
    # without ZeRO nothing is sharded: ZeRO-1's row on one GPU is exactly that
    plan = plan_memory(cfg, gpus=1 if stage == 'none' else gpus, gpu_mem_gb=gpu_mem_gb,
                       precision=precision, lengths=lengths,
                       overhead_gb=CUDA_OVERHEAD_GB if torch.cuda.is_available() else 0.0)
    row = plan['stages']['zero1' if stage == 'none' else stage]
    policy = dict(llm=row['checkpoint_layers'], vision=row['checkpoint_vision'])
    per_batch = ''
    if row['fits'] and 'per_batch' in row:
        # each micro-batch checkpoints what its own tokens need within the worst one's room
        policy['per_batch'] = row['per_batch']
        if plan.get('median_sample_tokens'):
            from mllm.models.llms import layers_to_checkpoint
            median = plan['median_sample_tokens'] * row['micro_batch']
            k = layers_to_checkpoint(median, plan['llm_layers'], **policy['per_batch'])
            per_batch = f'; per micro-batch from its tokens: {k} at a median one ({median} tokens)'
        else:
            per_batch = '; fewer for shorter micro-batches (per_batch)'
    cfg.model.gradient_checkpointing = policy
    log(f"gradient_checkpointing='auto': {row['checkpoint_layers']} of {plan['llm_layers']} LLM "
        f"layers checkpointed{', and the vision tower' if row['checkpoint_vision'] else ''} "
        f"at the worst micro-batch ({stage}, {gpus} GPU(s) x {gpu_mem_gb:.0f} GB, micro-batch "
        f"{row['micro_batch']}, {plan['lengths_from']}){per_batch}: {row['memory_gb']} GB "
        f"planned, recompute {100 * row['recompute_share']:.0f}% of the worst step"
        + ('' if row['fits'] else ' -- DOES NOT FIT even fully checkpointed'))
    return row
