"""Per-GPU memory estimate of a training config under each DeepSpeed ZeRO stage.

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

Activations of one transformer block (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", 16-bit, no tensor parallelism), with s the
sequence length, b the per-GPU micro-batch, h the hidden size and a the attention heads:

    without flash attention (eager):   s·b·h·(34 + 5·a·s/h) bytes
    with flash / SDPA attention:       34·s·b·h bytes (no s×s score matrix is stored)

Under gradient checkpointing each block keeps only its input (2·s·b·h bytes) and one block's
activations are live again while it is recomputed. The LM head's logits are counted as
s·b·V·10 bytes (bf16 logits, their fp32 copy for the loss and log-softmax's output). A
trainable vision tower adds the same block formula over its tokens and images; a frozen
one stores nothing for backward. A fixed ``CUDA_OVERHEAD_GB`` covers the CUDA context,
NCCL buffers and allocator fragmentation. fp32 doubles every activation term.
"""
from dataclasses import dataclass
from typing import Dict, Optional

GB = 1e9
# CUDA context (~0.5-1 GB), NCCL/DeepSpeed communication buckets and fragmentation
CUDA_OVERHEAD_GB = 3.0
STAGES = ('zero1', 'zero2', 'zero3', 'zero3_offload')
# bytes per parameter: (weights, gradients, optimizer state) by precision
STATE_BYTES = {'bf16': (2, 2, 12), 'fp32': (4, 4, 8)}


@dataclass
class Transformer:
    """What the activation formula needs of one tower."""
    layers: int
    hidden: int
    heads: int
    flash: bool


def block_activation_bytes(t: Transformer, seq: int, batch: int) -> float:
    """16-bit activations of one block (see module doc)."""
    sbh = seq * batch * t.hidden
    return sbh * 34 if t.flash else sbh * (34 + 5 * t.heads * seq / t.hidden)


def tower_activation_bytes(t: Transformer, seq: int, batch: int, checkpointing: bool) -> float:
    """All blocks of a tower: every block's activations, or the block inputs plus one
    recomputed block under gradient checkpointing."""
    block = block_activation_bytes(t, seq, batch)
    if checkpointing:
        return 2 * seq * batch * t.hidden * t.layers + block
    return block * t.layers


def model_state_gb(stage: str, params: int, trainable: int, gpus: int,
                   working_set: int, precision: str = 'bf16') -> Dict[str, float]:
    """Weights, gradients, optimizer state and ZeRO-3 working set on one GPU (GB)."""
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


def activation_gb(llm: Transformer, vocab: int, seq: int, batch: int, checkpointing: bool,
                  vision: Optional[Transformer] = None, vision_tokens: int = 0,
                  images: int = 0, precision: str = 'bf16') -> float:
    """Activations kept for backward on one GPU (GB); ``vision`` only when it trains."""
    scale = 2 if precision == 'fp32' else 1
    total = tower_activation_bytes(llm, seq, batch, checkpointing) + 10 * seq * batch * vocab
    if vision is not None and images:
        total += tower_activation_bytes(vision, vision_tokens, images, checkpointing)
    return scale * total / GB


def _transformer(config: dict, attn_implementation: Optional[str]) -> Optional[Transformer]:
    keys = ('num_hidden_layers', 'hidden_size', 'num_attention_heads')
    if not all(k in config for k in keys):
        return None  # e.g. ConvNeXt towers: no block formula
    return Transformer(layers=config['num_hidden_layers'], hidden=config['hidden_size'],
                       heads=config['num_attention_heads'],
                       flash=(attn_implementation or 'sdpa') != 'eager')


def _llm_working_set(report: dict, llm: dict) -> int:
    """Largest gathered unit under ZeRO-3: one LLM block or the embedding matrix."""
    c = llm['config']
    embed = c['vocab_size'] * c['hidden_size']
    block = (report['params']['llm'] - 2 * embed) / c['num_hidden_layers']
    return int(max(block, embed))


def plan_memory(cfg, gpus: int = 8, gpu_mem_gb: float = 80.0, precision: str = 'bf16',
                seq_len: Optional[int] = None, report: Optional[dict] = None,
                overhead_gb: float = CUDA_OVERHEAD_GB) -> dict:
    """The ``mllm plan`` report for a loaded config.

    Args:
        cfg: a loaded (bound) config.
        gpus: data-parallel GPUs (ZeRO shards over all of them). Defaults to 8.
        gpu_mem_gb: memory of one GPU. Defaults to 80.
        precision: 'bf16' (DeepSpeed mixed precision) or 'fp32'. Defaults to 'bf16'.
        seq_len: tokens per sample; defaults to the dataset's ``max_length``.
        report: ``inspect_config``'s report (built on the meta device when None).
        overhead_gb: fixed per-GPU overhead. Defaults to ``CUDA_OVERHEAD_GB``.
    """
    if report is None:
        from mllm.bench.inspect import inspect_config
        report = inspect_config(cfg)
    loader = cfg.train_dataloader
    seq = seq_len or loader.dataset.get('max_length', 2048)
    batch = loader.batch_size
    trainable = set(cfg.model.get('trainable', ()))
    llm = _transformer(cfg.llm['config'], cfg.llm.get('attn_implementation'))
    vision = None
    if 'vision_encoder' in trainable:
        vision = _transformer(cfg.vision_encoder.get('config', {}), 'eager')
    checkpointing = bool(cfg.model.get('gradient_checkpointing', False))
    act = {ckpt: activation_gb(llm, cfg.llm['config']['vocab_size'], seq, batch, ckpt, vision,
                               report['visual_tokens'] + 1, batch, precision)
           for ckpt in (False, True)}
    working = _llm_working_set(report, cfg.llm)
    stages = {}
    for stage in STAGES:
        states = model_state_gb(stage, report['params']['total'], report['trainable_params'],
                                gpus, working, precision)
        base = sum(states.values()) + overhead_gb
        memory = base + act[checkpointing]
        stages[stage] = dict(memory_gb=round(memory, 2), fits=memory <= gpu_mem_gb,
                             **{k: round(v, 2) for k, v in states.items()},
                             activations_gb=round(act[checkpointing], 2),
                             memory_gb_with_checkpointing=round(base + act[True], 2),
                             memory_gb_without_checkpointing=round(base + act[False], 2))
    offload = STATE_BYTES[precision]
    cheapest = next((s for s in STAGES if stages[s]['fits']), None)
    return dict(stages=stages, cheapest=cheapest, gpus=gpus, gpu_mem_gb=gpu_mem_gb,
                precision=precision, seq_len=seq, batch_per_gpu=batch,
                gradient_checkpointing=checkpointing, overhead_gb=overhead_gb,
                params=report['params']['total'], trainable_params=report['trainable_params'],
                visual_tokens=report['visual_tokens'],
                offload_cpu_gb=round(sum(
                    b * n for b, n in zip(offload, (report['params']['total'],
                                                    report['trainable_params'],
                                                    report['trainable_params']))) / GB, 1))
