"""Language models and tokenizers from Hugging Face folders or architecture dicts."""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from mllm.datasets.tokenizers import build_tokenizer  # noqa: F401 (mllm.models.build_tokenizer)
from mllm.hf_utils import from_pretrained_locally
from mllm.registry import MODELS

_DTYPES = {'auto': 'auto', 'float32': torch.float32, 'bfloat16': torch.bfloat16,
           'float16': torch.float16}


def _quantization_config(quantization: Optional[str]):
    if quantization is None:
        return None
    if quantization not in ('4bit', '8bit'):
        raise ValueError(f"llm.quantization must be None, '4bit' or '8bit', got {quantization!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f'QLoRA ({quantization} bitsandbytes quantization) needs a CUDA GPU; '
                           'set llm.quantization=None to train LoRA on this machine')
    if quantization == '8bit':
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


@MODELS.register_module()
def HFCausalLM(pretrained: Optional[str] = None,
               config: Optional[dict] = None,
               load_weights: bool = True,
               torch_dtype: str = 'float32',
               attn_implementation: Optional[str] = None,
               quantization: Optional[str] = None,
               trust_remote_code: bool = False):
    """A causal LM: ``pretrained`` weights, or random init from ``config``.

    Args:
        pretrained: HF id or local folder. Loaded from local files only.
        config: architecture fields incl. ``model_type`` (REFERENCE.md §2 values for the
            shipped backbones). Used for random init and for the meta-device inspector.
        load_weights: False builds from ``config`` (or the folder's config) without weights.
        torch_dtype: dtype of the loaded weights. Defaults to 'float32'.
        attn_implementation: 'eager', 'sdpa' or 'flash_attention_2'; None lets HF choose.
        quantization: None, '4bit' or '8bit' (QLoRA; CUDA only).
        trust_remote_code: run code shipped with the checkpoint; off unless asked for.
    """
    if torch_dtype not in _DTYPES:
        raise ValueError(f'llm.torch_dtype must be one of {sorted(_DTYPES)}, got {torch_dtype!r}')
    extra = {} if attn_implementation is None else {'attn_implementation': attn_implementation}
    quantization_config = _quantization_config(quantization)  # checked on every path
    if pretrained is not None and load_weights:
        return from_pretrained_locally(
            AutoModelForCausalLM, pretrained, 'LLM', torch_dtype=_DTYPES[torch_dtype],
            quantization_config=quantization_config,
            trust_remote_code=trust_remote_code, **extra)
    if quantization_config is not None:
        # NOTE: weights are quantized while they load; a random init would silently stay fp.
        raise ValueError(f'llm.quantization={quantization!r} needs pretrained weights to load '
                         '(set `pretrained` and load_weights=True, or quantization=None)')
    if config is not None:
        config = dict(config)
        hf_config = AutoConfig.for_model(config.pop('model_type'), **config)
    elif pretrained is not None:
        hf_config = AutoConfig.from_pretrained(pretrained, local_files_only=True,
                                               trust_remote_code=trust_remote_code)
    else:
        raise ValueError('the LLM config needs `pretrained` or `config`')
    dtype = _DTYPES[torch_dtype]
    return AutoModelForCausalLM.from_config(
        hf_config, torch_dtype=torch.float32 if dtype == 'auto' else dtype,
        trust_remote_code=trust_remote_code, **extra)


# Decoders whose training forward ``decode_learned_rows`` mirrors, in the transformers
# releases it mirrors (4.48: one generated body for all four; 5.25: one body, masks per
# family); another release runs HF's own forward
MIRRORED_DECODERS = ('LlamaModel', 'MistralModel', 'Qwen2Model', 'Phi3Model')
MIRRORED_TRANSFORMERS = ('4.48.', '5.25.')
_NO_DROPOUT = torch.nn.Identity()  # decoder layers without Phi-3's residual dropouts


def decode_learned_rows(decoder: torch.nn.Module, inputs_embeds: torch.Tensor,
                        rows: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None,
                        **unused) -> torch.Tensor:
    """The decoder's final (normed) hidden states at ``rows`` only: (N, C), row-major.

    ``rows`` (B, T) marks the positions whose output is read (those that predict a learned
    label). Every layer but the last runs in full, as HF's forward does; the last layer
    needs its attention (keys and values) everywhere, but its MLP, residual and the final
    norm only at ``rows``. Elsewhere their result would be dropped with the logits, and the
    backward through them is zero. Same values, a layer's MLP less work at the positions
    nobody reads (most of a LLaVA sample: image, system prompt, question).

    Other decoder classes, and any transformers other than 4.48 and 5.25, run in full, then
    select ``rows``.
    """
    if (type(decoder).__name__ not in MIRRORED_DECODERS or not decoder.config.num_hidden_layers
            or not transformers.__version__.startswith(MIRRORED_TRANSFORMERS)):
        return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).last_hidden_state[rows]
    if not transformers.__version__.startswith('4.'):
        return _decode_learned_rows_v5(decoder, inputs_embeds, rows, attention_mask, position_ids)
    length = inputs_embeds.shape[1]
    cache_position = torch.arange(length, device=inputs_embeds.device)
    if position_ids is None:
        position_ids = cache_position.unsqueeze(0)
    mask = decoder._update_causal_mask(attention_mask, inputs_embeds, cache_position, None, False)
    position_embeddings = decoder.rotary_emb(inputs_embeds, position_ids)
    layers = decoder.layers[:decoder.config.num_hidden_layers]
    checkpointing = decoder.gradient_checkpointing and decoder.training
    hidden = inputs_embeds
    for layer in layers[:-1]:
        if checkpointing:  # HF's own call, positional as in its forward
            hidden = decoder._gradient_checkpointing_func(
                layer.__call__, hidden, mask, position_ids, None, False, False, cache_position,
                position_embeddings)[0]
        else:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           cache_position=cache_position,
                           position_embeddings=position_embeddings)[0]
    last = functools.partial(_last_layer_at_rows, layers[-1], decoder.norm)
    args = (hidden, mask, position_ids, cache_position, position_embeddings, rows)
    return decoder._gradient_checkpointing_func(last, *args) if checkpointing else last(*args)


def _last_layer_at_rows(layer, norm, hidden, mask, position_ids, cache_position,
                        position_embeddings, rows):
    """A Llama-family decoder layer (Phi-3: plus its residual dropouts) and the final norm,
    with everything after the attention at ``rows`` only."""
    attended, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
        position_ids=position_ids, past_key_value=None, output_attentions=False,
        use_cache=False, cache_position=cache_position, position_embeddings=position_embeddings)
    hidden = (hidden + getattr(layer, 'resid_attn_dropout', _NO_DROPOUT)(attended))[rows]
    mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
    return norm(hidden + getattr(layer, 'resid_mlp_dropout', _NO_DROPOUT)(mlp_out))


def _decode_learned_rows_v5(decoder, inputs_embeds, rows, attention_mask, position_ids):
    """``decode_learned_rows`` for transformers 5.25: the decoders' forward without a
    cache. Masks come from ``masking_utils`` as each family builds them (Qwen2 per layer
    type, Mistral/Phi-3 sliding-window when configured); a layer checkpoints its own
    ``forward`` when gradient checkpointing is on, so it is just called."""
    from transformers import masking_utils

    if position_ids is None:
        position_ids = torch.arange(inputs_embeds.shape[1],
                                    device=inputs_embeds.device).unsqueeze(0)
    config = decoder.config
    mask_kwargs = dict(config=config, inputs_embeds=inputs_embeds,
                       attention_mask=attention_mask, cache=None, position_ids=position_ids)
    layers = decoder.layers[:config.num_hidden_layers]
    if hasattr(decoder, 'has_sliding_layers'):  # Qwen2: one mask per layer type
        masks = {'full_attention': masking_utils.create_causal_mask(**mask_kwargs)}
        if decoder.has_sliding_layers:
            masks['sliding_attention'] = masking_utils.create_sliding_window_causal_mask(
                **mask_kwargs)
        layer_masks = [masks[config.layer_types[i]] for i in range(len(layers))]
    else:
        create = (masking_utils.create_causal_mask
                  if getattr(config, 'sliding_window', None) is None
                  else masking_utils.create_sliding_window_causal_mask)
        layer_masks = [create(**mask_kwargs)] * len(layers)
    position_embeddings = decoder.rotary_emb(inputs_embeds, position_ids=position_ids)
    hidden = inputs_embeds
    for layer, mask in zip(layers[:-1], layer_masks[:-1]):
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                       position_embeddings=position_embeddings)
    last = functools.partial(_last_layer_at_rows_v5, layers[-1], decoder.norm)
    args = (hidden, layer_masks[-1], position_ids, position_embeddings, rows)
    if layers[-1].gradient_checkpointing and layers[-1].training and torch.is_grad_enabled():
        return layers[-1]._gradient_checkpointing_func(last, *args)
    return last(*args)


def _last_layer_at_rows_v5(layer, norm, hidden, mask, position_ids, position_embeddings, rows):
    """``_last_layer_at_rows`` with transformers 5.25's attention call."""
    attended, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
        position_ids=position_ids, position_embeddings=position_embeddings)
    hidden = (hidden + getattr(layer, 'resid_attn_dropout', _NO_DROPOUT)(attended))[rows]
    mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
    return norm(hidden + getattr(layer, 'resid_mlp_dropout', _NO_DROPOUT)(mlp_out))


def enable_gradient_checkpointing(llm: torch.nn.Module, layers: Optional[int] = None) -> int:
    """Recompute the activations of the first ``layers`` decoder layers in the backward pass
    (all of them when None); returns how many layers checkpoint.

    transformers 5 makes every decoder layer a ``GradientCheckpointingLayer`` that checks
    its own ``gradient_checkpointing`` flag (5.25's ``every_n_layers`` sets it on every
    n-th), so checkpointing the first K layers is HF's own enable call with the flag
    cleared on the rest: any K, not only len / n. Which layers does
    not change the memory (each stores its input or its activations alike); the first
    ones, so the last layer (answer-only, ``decode_learned_rows``) keeps its activations.
    Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings
    (pretraining, LoRA) need no ``enable_input_require_grads``.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers 4.x before 4.52: one flag on the decoder
        GradientCheckpointingLayer = None
    kwargs = {'use_reentrant': False}
    if hasattr(llm, 'activation_checkpointing_enable'):  # 5.25 deprecates the other name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if GradientCheckpointingLayer is None:
        if layers is not None:
            raise ValueError(f'checkpointing {layers} of the LLM layers needs transformers>=4.52 '
                             f'(this is {transformers.__version__}); use True or False')
        return llm.config.num_hidden_layers
    if layers is None:
        return len(_decoder_blocks(llm))
    return set_checkpointed_layers(llm, layers)


def _decoder_blocks(llm: torch.nn.Module) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(llm: torch.nn.Module, layers: int) -> int:
    """Checkpoint the first ``layers`` decoder layers and no other (flags only: HF's enable
    call must have run, ``enable_gradient_checkpointing``)."""
    blocks = _decoder_blocks(llm)
    if not 0 <= layers <= len(blocks):
        raise ValueError(f'gradient checkpointing of {layers} LLM layers: the LLM has '
                         f'{len(blocks)} decoder layers')
    for k, block in enumerate(blocks):
        block.gradient_checkpointing = k < layers
    return layers


PER_BATCH_KEYS = ('room_gb', 'kept', 'checkpointed')


def layers_to_checkpoint(tokens: int, layers: int, room_gb: float, kept: float,
                         checkpointed: float) -> int:
    """The fewest of the first LLM layers to checkpoint so that a micro-batch of ``tokens``
    fits ``room_gb``: ``kept`` bytes per token in each other layer, ``checkpointed`` (its
    input) in each checkpointed one, and one layer's activations again while it is
    recomputed when all are (``mllm.bench.memory.tower_activation_bytes``, the same count).
    All layers when even that does not fit."""
    room = room_gb * 1e9
    for k in range(layers + 1):
        need = tokens * (k * checkpointed + (layers - k) * kept + (kept if k == layers else 0))
        if need <= room:
            return k
    return layers


def checkpointing_policy(value) -> tuple:
    """``LLaVAModel(gradient_checkpointing=...)`` as (LLM layers, vision tower): LLM layers
    False (none), None (all) or a count; 'auto' (not resolved yet) checkpoints nothing."""
    if value == 'auto' or value is False or value is None:
        return False, False
    if value is True:
        return None, True
    if isinstance(value, int):
        return (value if value > 0 else False), False
    if isinstance(value, dict) and set(value) <= {'llm', 'vision', 'per_batch'}:
        per_batch = value.get('per_batch')
        if per_batch is not None and (
                not isinstance(per_batch, dict) or set(per_batch) != set(PER_BATCH_KEYS)
                or not all(isinstance(per_batch[k], (int, float)) and per_batch[k] > 0
                           for k in PER_BATCH_KEYS)):
            raise ValueError(f'gradient_checkpointing.per_batch must be dict(room_gb=..., '
                             f'kept=..., checkpointed=...) of positive numbers (bytes per '
                             f'token per layer), got {per_batch!r}')
        llm = value.get('llm', False)
        if llm is True:
            llm = None
        elif llm is False or llm == 0:
            llm = False
        elif not isinstance(llm, int) or llm < 0:
            raise ValueError(f'gradient_checkpointing.llm must be a bool or a layer count, '
                             f'got {llm!r}')
        return llm, bool(value.get('vision', False))
    raise ValueError("gradient_checkpointing must be True, False, 'auto', a number of LLM layers "
                     f'or dict(llm=..., vision=..., per_batch=...), got {value!r}')


# transformers' RMSNorm classes whose forward is Llama's (fp32 mean of squares, weight
# times the normalised input cast back) and MLP classes that are SwiGLU
FUSABLE_NORMS = ('LlamaRMSNorm', 'MistralRMSNorm', 'Qwen2RMSNorm', 'Qwen3RMSNorm',
                 'Phi3RMSNorm')
FUSABLE_MLPS = ('LlamaMLP', 'MistralMLP', 'Qwen2MLP', 'Qwen3MLP', 'Phi3MLP')
COMPILE_ON_CPU = False  # tests compile on CPU to count what the fused ops save


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _fused(fn, *args):
    """``fn`` compiled (one kernel forward, one backward; autograd keeps the inputs and
    recomputes the rest) when training on CUDA; eager on CPU, where the compile costs more
    than it saves, and without gradients (evaluation, chat, generate), so that inference
    gives HF's values to the bit, as the exported model will."""
    return (_compiled(fn) if _compiled_mode(args[0]) else fn)(*args)


def _compiled_mode(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda or COMPILE_ON_CPU) and torch.is_grad_enabled()


def _fused_norm_forward(self, hidden_states):
    return _fused(_rms_norm, hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x):
    if hasattr(self, 'gate_up_proj'):  # Phi-3: one projection, halves gate and up
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    product = _fused(_silu_mul, gate, up)
    # The compiled product's backward keeps only gate and up; down_proj would keep the
    # product too (2i bytes a token). It is one pointwise kernel of what is kept anyway, so
    # down_proj's backward gets it recomputed instead. Not in eager mode, whose SiLU keeps
    # more than the planner's fused count; not when gate and up need no gradient (nothing
    # keeps them then); not inside a checkpointed layer: checkpoint's hooks keep nothing
    # there, and ours would keep gate and up alive.
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if (not _compiled_mode(product) or not (gate.requires_grad or up.requires_grad)
            or (outer is not None
                and getattr(outer[0], '__module__', '').startswith(CHECKPOINT_HOOK_MODULES))):
        return self.down_proj(product)
    with torch.autograd.graph.saved_tensors_hooks(*_recomputed_product(product, gate, up, outer)):
        return self.down_proj(product)


# where the saved-tensor hooks of activation checkpointing live (PyTorch's non-reentrant
# checkpoint, DeepSpeed's)
CHECKPOINT_HOOK_MODULES = ('torch.utils.checkpoint', 'deepspeed')


class _Recompute(NamedTuple):
    """A saved view of the SwiGLU product, kept as what rebuilds it."""
    size: torch.Size
    stride: Tuple[int, ...]
    offset: int


class _Saved(NamedTuple):
    """Any other saved tensor, with its version: under saved-tensor hooks autograd no
    longer checks that a saved tensor was not modified in place before the backward."""
    tensor: torch.Tensor
    version: int


def _check_version(tensor: torch.Tensor, version: int) -> torch.Tensor:
    if tensor._version != version:
        raise RuntimeError(
            f'one of the variables needed for gradient computation has been modified by an '
            f'inplace operation: {tuple(tensor.shape)} {tensor.dtype} is at version '
            f'{tensor._version}; expected version {version} instead (fused SwiGLU down_proj)')
    return tensor


def _recomputed_product(product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        outer: Optional[tuple] = None):
    """saved_tensors_hooks that store any view of ``product`` (the linear may save its
    input reshaped) as gate and up, and rebuild it with the same compiled kernel: the same
    bits as the forward's (tests/test_fused.py). No reference to ``product`` is held.
    ``outer``: hooks already active (offloading, counting), through which everything kept
    here still goes, gate and up once; without them, each saved tensor's version is
    checked in the backward as autograd would."""
    storage = product.untyped_storage().data_ptr()
    layout = (product.size(), product.stride(), product.storage_offset())
    sources = {}  # gate and up as kept, packed on the first saved view of the product

    def pack(tensor):
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)  # subclasses: not ours
        if not plain or tensor.untyped_storage().data_ptr() != storage:
            return outer[0](tensor) if outer else _Saved(tensor, tensor._version)
        if not sources:
            sources['kept'] = ((outer[0](gate), outer[0](up)) if outer else
                               (_Saved(gate, gate._version), _Saved(up, up._version)))
        return _Recompute(tensor.size(), tensor.stride(), tensor.storage_offset())

    def restore(packed):
        return (outer[1](packed) if outer else _check_version(*packed))

    def unpack(packed):
        if not isinstance(packed, _Recompute):
            return restore(packed)
        with torch.no_grad():
            full = _compiled(_silu_mul)(*map(restore, sources['kept']))
        # as_strided would misread a product laid out otherwise than the forward's
        if (full.size(), full.stride(), full.storage_offset()) != layout:
            raise RuntimeError(f'fused SwiGLU: the recomputed product has the layout '
                               f'{full.size(), full.stride(), full.storage_offset()}, the '
                               f'forward\'s {layout}')
        return full.as_strided(packed.size, packed.stride, packed.offset)

    return pack, unpack


def fuse_elementwise(llm: torch.nn.Module, enabled: bool = True) -> int:
    """Run each RMSNorm and each SwiGLU product of the LLM as one compiled kernel when
    training on CUDA (``_fused``: evaluation and generation keep HF's ops).

    transformers' RMSNorm is six memory-bound kernels forward and keeps an fp32 copy of its
    input plus the bf16 normalised input for the backward (6 bytes per element more than
    its bf16 input); SwiGLU keeps SiLU's output besides the gate and the up projection.
    Compiled, each keeps only its inputs (and the fp32 reciprocal norm), and down_proj's
    backward recomputes the product rather than keep it, which takes 8h + 4i bytes per token
    off every kept layer (``mllm.bench.memory``), and reads the activations once. The
    forward's values are the same ops in the same precision; the compiled reduction may
    round differently in the last bit. ``enabled=False`` restores HF's forwards. Returns
    how many modules run fused; a model with none is an error.
    """
    count = 0
    for module in llm.modules():
        name = type(module).__name__
        act = getattr(module, 'act_fn', None) or getattr(module, 'activation_fn', None)
        if name in FUSABLE_NORMS:
            fused = _fused_norm_forward
        elif name in FUSABLE_MLPS and type(act).__name__ in ('SiLU', 'SiLUActivation'):
            fused = _fused_mlp_forward
        else:
            continue
        if enabled:
            module.forward = fused.__get__(module)
        else:
            module.__dict__.pop('forward', None)
        count += 1
    if not count:
        raise ValueError(f'fused_elementwise: {type(llm).__name__} has no RMSNorm '
                         f'({", ".join(FUSABLE_NORMS)}) or SwiGLU MLP '
                         f'({", ".join(FUSABLE_MLPS)}) to fuse; set fused_elementwise=False')
    return count
