"""Visual tokens and compute: LLaVA-1.5 (CLIP ViT-L/14-336) vs ConvLLaVA at 768/1024/1536.

Analytic multiply-accumulates from the architectures (GFLOPs = 2 x MACs; LayerNorm, GELU,
softmax and biases are ignored, they are < 1%), plus the measured CPU forward time of the
tiny CPU variants (configs/tiny). Not a test: numbers depend on the machine.

    .venv/bin/python tools/bench_convllava.py
"""
import time

import torch

TEXT_TOKENS = 100  # text prompt length assumed per sample
VICUNA7B = dict(hidden=4096, layers=32, ffn=11008, vocab=32000)
CONVNEXT_L = dict(depths=(3, 3, 27, 3, 6), dims=(192, 384, 768, 1536, 3072))  # + stage 5


def vit_l_336_macs(layers_run: int = 23) -> float:
    """CLIP ViT-L/14-336 up to layer -2 (LLaVA's select_layer): 577 tokens of width 1024."""
    n, d, ffn = 577, 1024, 4096
    patch_embed = 576 * (3 * 14 * 14) * d
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * ffn  # qkvo, QK^T and AV, MLP
    return patch_embed + layers_run * per_layer


def convnext_macs(side: int, depths=CONVNEXT_L['depths'], dims=CONVNEXT_L['dims']) -> float:
    """Stem (4x4 patchify) + stages (downsample k2 s2, blocks: dwconv 7x7 and c -> 4c -> c)."""
    res = side // 4
    macs = res * res * 48 * dims[0]
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i:
            res //= 2
            macs += res * res * 4 * dims[i - 1] * c
        macs += depth * res * res * (49 * c + 8 * c * c)
    return macs


def llm_prefill_macs(tokens: int, hidden: int, layers: int, ffn: int, vocab: int) -> float:
    """All prompt positions through every layer (full T x T attention), LM head on the last."""
    per_layer = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 3 * tokens * hidden * ffn
    return layers * per_layer + hidden * vocab


def analytic_rows():
    rows = [('LLaVA-1.5 ViT-L/336', 336, 576, vit_l_336_macs())]
    for side in (768, 1024, 1536):
        rows.append((f'ConvLLaVA-{side}', side, (side // 64) ** 2, convnext_macs(side)))
    return [(name, side, tokens, 2 * macs / 1e9,
             2 * llm_prefill_macs(tokens + TEXT_TOKENS, **VICUNA7B) / 1e9)
            for name, side, tokens, macs in rows]


def measure_tiny(config: str, repeats: int = 5, batch: int = 8) -> tuple:
    """Median CPU seconds of (vision encoder + projector, LLM prefill) for one batch."""
    from mllm.engine.config import load_config
    from mllm.registry import MODELS
    cfg = load_config(config)
    model = MODELS.build(cfg.model).eval()
    size = cfg.image_processor.size
    pixels = torch.randn(batch, 3, size, size)
    times = {'vision': [], 'llm': []}
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            feats = model.projector(model.vision_encoder(pixels))  # (B, N, C)
            times['vision'].append(time.perf_counter() - start)
            text = model.llm.get_input_embeddings()(torch.zeros(batch, TEXT_TOKENS, dtype=torch.long))
            start = time.perf_counter()
            model.llm(inputs_embeds=torch.cat([feats, text], 1), use_cache=False)
            times['llm'].append(time.perf_counter() - start)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return size, feats.shape[1], median['vision'], median['llm']


def main():
    torch.manual_seed(0)
    print(f'| model | input | visual tokens | vision GFLOPs / image | LLM prefill GFLOPs / sample '
          f'(vicuna7b, +{TEXT_TOKENS} text tokens) |')
    print('|---|---|---|---|---|')
    for name, side, tokens, vision, llm in analytic_rows():
        print(f'| {name} | {side}² | {tokens} | {vision:,.0f} | {llm:,.0f} |')
    print('\nTiny CPU variants (batch 8, median of 5 forwards, ms):\n')
    print('| config | input | visual tokens | vision + projector | LLM prefill |')
    print('|---|---|---|---|---|')
    for config in ('configs/tiny/tiny_llava_synthetic.py', 'configs/tiny/tiny_convllava_synthetic.py',
                   'configs/tiny/tiny_convllava_synthetic_stage1.py'):
        size, tokens, vision, llm = measure_tiny(config)
        print(f'| {config.split("/")[-1][:-3]} | {size}² | {tokens} | {1e3 * vision:.1f} | {1e3 * llm:.1f} |')


if __name__ == '__main__':
    main()
