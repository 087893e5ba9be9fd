"""``fused_elementwise``: the LLM's RMSNorms and SwiGLU products as compiled kernels (CUDA in
training; compiled on CPU here to check them). Same values as transformers' modules, less
kept for the backward, exactly what the planner counts."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mllm.models.llms as llms
from mllm.bench.memory import Transformer, block_bytes_per_token
from mllm.models.llms import fuse_elementwise


def _tiny(model_type, **extra):
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=176,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, vocab_size=96,
                                  attn_implementation='sdpa', pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def compile_on_cpu(monkeypatch):
    monkeypatch.setattr(llms, 'COMPILE_ON_CPU', True)


@pytest.mark.parametrize('model_type', ['llama', 'phi3'])  # the recipes' LLM families
def test_fused_step_equals_transformers_modules(model_type, compile_on_cpu):
    model = _tiny(model_type).train()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, ids)
    assert fuse_elementwise(model) == 2 * 2 + 1 + 2  # two norms and an MLP per layer, final norm
    fused_loss, fused_grads = _loss_and_grads(model, ids)
    assert torch.equal(fused_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    fuse_elementwise(model, enabled=False)  # HF's forwards back
    assert not any('forward' in vars(m) for m in model.modules())


def test_fused_layer_keeps_what_the_planner_counts(compile_on_cpu):
    """bf16: autograd keeps 12h + 4i (+ attention terms) bytes per token in a fused Llama
    layer instead of 20h + 8i: the SwiGLU product is recomputed for down_proj's backward."""
    from test_plan import _saved_bytes_per_token
    model = _tiny('llama').to(torch.bfloat16).train()
    fuse_elementwise(model)
    tokens = 64
    positions = torch.arange(tokens)[None]
    rope = model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    layer = model.model.layers[0]
    saved = _saved_bytes_per_token(layer, 64, tokens, attention_mask=None,
                                   position_ids=positions, position_embeddings=rope)
    tower = Transformer(layers=1, hidden=64, heads=4, kv_heads=2, flash=True, intermediate=176)
    assert block_bytes_per_token(Transformer(**dict(vars(tower), fused=True))) == pytest.approx(
        saved, rel=0.01)
    assert block_bytes_per_token(tower) - saved == pytest.approx(8 * 64 + 4 * 176, rel=0.01)


@pytest.mark.parametrize('model_type', ['llama', 'phi3'])  # phi3: gate and up are views
def test_swiglu_product_is_recomputed_bit_for_bit(model_type, compile_on_cpu, monkeypatch):
    """down_proj's backward gets the SwiGLU product rebuilt from gate and up by the same
    compiled kernel: the same gradients, bit for bit, as keeping it. Inside a checkpointed
    layer checkpoint's own hooks stay in charge (ours would keep gate and up alive)."""
    model = _tiny(model_type).train()
    fuse_elementwise(model)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    recomputed_product = llms._recomputed_product
    monkeypatch.setattr(llms, '_recomputed_product',
                        lambda *args: calls.append(1) or recomputed_product(*args))
    loss, grads = _loss_and_grads(model, ids)
    assert len(calls) == 2  # one MLP per layer
    monkeypatch.setattr(llms, '_recomputed_product', lambda *args: (lambda t: t, lambda t: t))
    kept_loss, kept_grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, kept_loss)
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad), name
    calls.clear()
    monkeypatch.setattr(llms, '_recomputed_product',
                        lambda *args: calls.append(1) or recomputed_product(*args))
    llms.enable_gradient_checkpointing(model, 2)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, ids)
    assert calls == []
    assert torch.equal(loss, checkpointed_loss)
    for name, grad in grads.items():
        assert torch.equal(checkpointed_grads[name], grad), name


def test_in_place_change_before_the_backward_is_still_an_error(compile_on_cpu):
    """Under saved-tensor hooks autograd stops checking saved tensors' versions; the
    recompute's hooks check them instead, as autograd would without them."""
    model = _tiny('llama').train()
    fuse_elementwise(model)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    with pytest.raises(RuntimeError, match=r'modified by an inplace operation.*fused SwiGLU'):
        loss.backward()


def test_fused_runs_eager_on_cpu_by_default(monkeypatch):
    """CPU training (the tiny configs, CI) pays no compile; the fused forwards still run."""
    compiled = []
    monkeypatch.setattr(llms, '_compiled', lambda fn: compiled.append(fn) or fn)
    model = _tiny('llama').train()
    fuse_elementwise(model)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert compiled == []
    monkeypatch.setattr(llms, 'COMPILE_ON_CPU', True)
    with torch.no_grad():  # evaluation and generation: HF's own values
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert compiled == []
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert llms._rms_norm in compiled and llms._silu_mul in compiled


def test_fusing_an_llm_without_known_modules_is_an_error():
    config = AutoConfig.for_model('gpt2', n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match=r'fused_elementwise: GPT2LMHeadModel has no RMSNorm'):
        fuse_elementwise(AutoModelForCausalLM.from_config(config))


def test_fused_plan_checkpoints_fewer_layers():
    """LLaVA-1.5-7B at 8 x 80 GB, ZeRO-2, micro-batch 16: 22 of 32 layers with the fused
    kernels against 27 without (docs/performance.md)."""
    from mllm.bench.memory import plan_memory
    from mllm.engine.config import load_config
    fused = plan_memory(load_config('llava15_vicuna7b_finetune'))['stages']['zero2']
    plain = plan_memory(load_config('llava15_vicuna7b_finetune',
                                    {'model.fused_elementwise': False}))['stages']['zero2']
    assert (fused['checkpoint_layers'], plain['checkpoint_layers']) == (22, 27)
    assert fused['fits'] and fused['memory_gb'] <= 80
