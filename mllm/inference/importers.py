"""Released checkpoints -> mllm checkpoints (``mllm convert hf-to-pth CONFIG SRC OUT.pth``).

Each released layout is one key map (``LAYOUTS``): an ordered table of regular expressions
from the release's parameter names to mllm's, first match wins. A rule whose target is None
names a tensor the release carries but mllm has no place for on purpose (the reason is
printed). Every other source key must map to a model tensor of the same shape, and every
model tensor must get one, except those of a part whose config loads ``pretrained`` weights
(the CLIP tower of an original LLaVA folder comes from ``vision_encoder.pretrained``, as
the official ``builder.py`` loads it from ``mm_vision_tower``): anything else is an error
naming a few keys.

The output is what a training run writes (``state_dict`` + ``meta.trainable_only``, a
``.sha256`` beside it): ``--load-from``, ``mllm chat --checkpoint`` and ``convert pth-to-hf``
take it; the tensors left out are the ones the config loads from ``pretrained``.
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

# ------------------------------------------------------------------ the key maps


def _sequential(prefix: str):
    """A rule target for an ``nn.Sequential(Linear, GELU, Linear, ...)`` projector (LLaVA's
    ``mm_projector``, XTuner's ``ProjectorModel.model``): index 0, 2, 4 -> ``linear_1``,
    ``linear_2``, ``linear_3`` of ``MLPProjector``."""
    def target(match):
        index, param = match.groups()
        return f'{prefix}.linear_{int(index) // 2 + 1}.{param}'
    return target


# The LLM of LlavaLlamaForCausalLM (original LLaVA, ConvLLaVA, LLaVA-UHD): a LlamaForCausalLM
_LLAVA_LLM = [
    (r'^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$',
     None, 'rotary frequencies (a buffer of transformers < 4.35, recomputed)'),
    (r'^model\.(.*)$', r'llm.model.\1'),
    (r'^lm_head\.(.*)$', r'llm.lm_head.\1'),
]
_LLAVA_PROJECTOR = [
    (r'^model\.mm_projector\.(\d*[02468])\.(weight|bias)$', _sequential('projector')),
    (r'^model\.mm_projector\.(weight|bias)$', r'projector.linear_1.\1'),
]
_CLIP_BUFFERS = (r'position_ids$', None, "CLIP's position-id buffer (transformers < 4.31)")


@dataclass
class Layout:
    name: str
    what: str
    rules: List[tuple]
    # parts that must come from the source (the rest may come from the config's `pretrained`)
    required: Tuple[str, ...] = ()


LAYOUTS: Dict[str, Layout] = {l.name: l for l in [
    Layout('llava_hf', "transformers' LlavaForConditionalGeneration folder (llava-hf/*)", [
        (r'^(?:model\.)?vision_tower\.(?:vision_model\.)?' + _CLIP_BUFFERS[0], *_CLIP_BUFFERS[1:]),
        # transformers 4.x layout
        (r'^language_model\.model\.(.*)$', r'llm.model.\1'),
        (r'^language_model\.lm_head\.(.*)$', r'llm.lm_head.\1'),
        # transformers 5 layout
        (r'^model\.language_model\.(.*)$', r'llm.model.\1'),
        (r'^lm_head\.(.*)$', r'llm.lm_head.\1'),
        (r'^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$', r'vision_encoder.model.\1'),
        (r'^(?:model\.)?multi_modal_projector\.(.*)$', r'projector.\1'),
    ], required=('llm', 'projector', 'vision_encoder')),
    Layout('llava', 'original LLaVA-1.5 folder (LlavaLlamaForCausalLM, haotian-liu/LLaVA)', [
        (r'^model\.vision_tower\.vision_tower\.(?:vision_model\.)?' + _CLIP_BUFFERS[0],
         *_CLIP_BUFFERS[1:]),
        # present only when the tower was saved with the model (frozen: the CLIP it names)
        (r'^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.*)$',
         r'vision_encoder.model.\1'),
        *_LLAVA_PROJECTOR, *_LLAVA_LLM,
    ], required=('llm', 'projector')),
    Layout('llava_projector', "LLaVA's stage-1 mm_projector.bin (projector only)", [
        *_LLAVA_PROJECTOR,
    ], required=('projector',)),
    Layout('convllava', "ConvLLaVA's LlavaLlamaForCausalLM with the 5-stage ConvNeXt tower", [
        (r'^model\.vision_tower\.vision_tower\.embeddings\.(.*)$', r'vision_encoder.stem.\1'),
        (r'^model\.vision_tower\.vision_tower\.encoder\.stages\.([0-3])\.(.*)$',
         r'vision_encoder.stages.\1.\2'),
        (r'^model\.vision_tower\.vision_tower\.encoder\.stages\.4\.(.*)$',
         r'vision_encoder.stage5.\1'),
        (r'^model\.vision_tower\.vision_tower\.layernorm\.(weight|bias)$', None,
         "ConvNextModel's final LayerNorm: the release reads encoder.hidden_states[-1], "
         'before it'),
        *_LLAVA_PROJECTOR, *_LLAVA_LLM,
    ], required=('llm', 'projector')),
    Layout('uhd', "LLaVA-UHD's LlavaLlamaForCausalLM (perceiver resampler, adapted CLIP)", [
        (r'^model\.vision_tower\.vision_tower\.(?:vision_model\.)?' + _CLIP_BUFFERS[0],
         *_CLIP_BUFFERS[1:]),
        (r'^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.*)$',
         r'vision_encoder.model.\1'),
        # the release's fixed 2-D sin-cos table (a frozen Parameter there, a buffer here):
        # checked equal to ours, not loaded
        (r'^model\.mm_projector\.pos_embed$', 'CHECK:projector.pos_embed'),
        (r'^model\.mm_projector\.(query|proj)$', r'projector.\1'),
        (r'^model\.mm_projector\.((?:kv_proj|attn|ln_q|ln_kv|ln_post)\..*)$', r'projector.\1'),
        *_LLAVA_LLM,
    ], required=('llm', 'projector')),
    Layout('mgllava', "MG-LLaVA's XTuner state dict (iter_N.pth / its .bin)", [
        (r'^projector\.model\.(\d*[02468])\.(weight|bias)$', _sequential('projector')),
        (r'^bbox_projector\.model\.(\d*[02468])\.(weight|bias)$',
         _sequential('bbox_projector')),
        (r'^fuse_module\.slow_conv\.(.*)$', r'fusion.conv_high.\1'),
        (r'^fuse_module\.slow_proj\.(.*)$', r'fusion.proj_high.\1'),
        (r'^fuse_module\.fast_conv\.(.*)$', r'fusion.dwconv_low.\1'),
        (r'^fuse_module\.fast_proj\.(.*)$', r'fusion.proj_low.\1'),
        (r'^fuse_module\.gate\.(.*)$', r'fusion.gate.\1'),
        (r'^visual_encoder\.(?:vision_model\.)?' + _CLIP_BUFFERS[0], *_CLIP_BUFFERS[1:]),
        (r'^visual_encoder\.(?:vision_model\.)?(.*)$', r'vision_encoder.model.\1'),
        # XTuner saves a LoRA LLM with peft's adapter-less names (lora_A.weight)
        (r'^llm\.(.*\.lora_[AB])\.weight$', r'llm.\1.default.weight'),
        (r'^llm\.(.*)$', r'llm.\1'),
    ], required=('projector', 'bbox_projector', 'fusion')),
]}


def map_key(layout: Layout, key: str):
    """``(target, reason)``: the mllm key of ``key`` (None with a reason: a known tensor
    mllm does not use); ``(None, None)`` when no rule matches."""
    for rule in layout.rules:
        pattern, target = rule[0], rule[1]
        match = re.match(pattern, key)
        if not match:
            continue
        if target is None:
            return None, rule[2]
        if callable(target):
            return target(match), None
        return match.expand(target), None
    return None, None


# ------------------------------------------------------------------ reading a release

def _read_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    from mllm.engine.checkpoint import load_checkpoint_file

    # torch's safe loader (weights_only=True; DeepSpeed's few plain classes allowed by name)
    state = load_checkpoint_file(path)
    if isinstance(state, dict):
        for key in ('state_dict', 'module', 'model'):  # XTuner / DeepSpeed / plain wrappers
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'{path}: not a state dict of tensors ({bad[:3]} are not tensors)')
    return state


WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors',
                'pytorch_model.bin.index.json', 'pytorch_model.bin', 'mm_projector.bin',
                'mp_rank_00_model_states.pt')  # the last: an XTuner DeepSpeed iter_N.pth folder


def read_source(src: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, config.json or {}) of a released folder or weights file. ``.bin`` /
    ``.pth`` load with ``torch.load(weights_only=True)``; sharded folders through their index."""
    if os.path.isfile(src):
        config_path = os.path.join(os.path.dirname(src), 'config.json')
        config = {}
        if os.path.basename(src) != 'mm_projector.bin' and os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        return _read_file(src), config
    if not os.path.isdir(src):
        raise FileNotFoundError(f'{src}: no such file or folder')
    found = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(src, name))]
    if not found:
        raise FileNotFoundError(f'{src} holds none of {", ".join(WEIGHT_FILES)}')
    name = found[0]
    config = {}
    if os.path.isfile(os.path.join(src, 'config.json')):
        with open(os.path.join(src, 'config.json')) as f:
            config = json.load(f)
    if name.endswith('.index.json'):
        with open(os.path.join(src, name)) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        state = {}
        for shard in shards:
            state.update(_read_file(os.path.join(src, shard)))
        return state, config
    return _read_file(os.path.join(src, name)), config


def detect_layout(state: Dict[str, torch.Tensor], config: dict, model) -> str:
    """The layout of a release from its keys (and, for the LlavaLlamaForCausalLM family,
    from the model the config builds)."""
    keys = list(state)
    if any('multi_modal_projector.' in k for k in keys) or \
            'LlavaForConditionalGeneration' in (config.get('architectures') or []):
        return 'llava_hf'
    if any(k.startswith(('fuse_module.', 'bbox_projector.', 'projector.model.', 'llm.'))
           for k in keys):
        return 'mgllava'
    if keys and all(k.startswith('model.mm_projector.') for k in keys):
        return 'llava_projector'
    encoder = type(getattr(model, 'vision_encoder', None)).__name__
    if encoder == 'ConvNeXtEncoder' or any('.encoder.stages.' in k for k in keys):
        return 'convllava'
    if type(getattr(model, 'projector', None)).__name__ == 'Resampler' or \
            'model.mm_projector.query' in state:
        return 'uhd'
    if any(k.startswith('model.') for k in keys):
        return 'llava'
    raise ValueError(f'cannot tell the layout of these weights (keys like {keys[:3]}); pass '
                     f'--layout, one of {sorted(LAYOUTS)}')


# ------------------------------------------------------------------ mapping onto the model

def _candidates(key: str):
    """``key`` and its spellings in other transformers / peft arrangements: CLIP with or
    without ``vision_model.``, an LLM wrapped by peft (``base_model.model.``, ``base_layer``)."""
    yield key
    clip, wrapped = 'vision_encoder.model.', 'vision_encoder.model.vision_model.'
    if key.startswith(wrapped):
        yield clip + key[len(wrapped):]
    elif key.startswith(clip):
        yield wrapped + key[len(clip):]
    if key.startswith('llm.') and not key.startswith('llm.base_model.model.'):
        peft = 'llm.base_model.model.' + key[len('llm.'):]
        yield peft
        head, _, param = peft.rpartition('.')
        yield f'{head}.base_layer.{param}'


def pretrained_parts(model_cfg) -> set:
    """Top-level parts whose config reads ``pretrained`` weights when the model is built."""
    return {name for name, part in model_cfg.items() if isinstance(part, dict)
            and part.get('pretrained') is not None and part.get('load_weights', True)}


def _weight_origin(model, key: str, from_pretrained: set) -> Optional[str]:
    """``mllm.models.llava.weight_origin`` of a model built without weights (on the meta
    device): a part counts as 'pretrained' when its config reads ``pretrained``."""
    from mllm.models.llava import weight_origin
    origin = weight_origin(model, key)
    if origin is None:
        return None
    return 'pretrained' if key.split('.')[0] in from_pretrained else origin


@dataclass
class ImportResult:
    state: Dict[str, torch.Tensor]
    layout: str
    dropped: Dict[str, str]     # source key -> why it is not used
    from_config: List[str]      # model parts whose weights come from the config's pretrained
    notes: List[str]


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    return ', '.join(keys[:n]) + (f' ... ({len(keys)} in all)' if len(keys) > n else '')


def map_state_dict(state: Dict[str, torch.Tensor], model, layout_name: str,
                   config: Optional[dict] = None,
                   from_pretrained: Optional[set] = None) -> ImportResult:
    """Rename a release's tensors to ``model``'s keys and check that nothing is left over
    on either side (see the module docstring). ``from_pretrained``: the parts the config
    loads from ``pretrained`` (default: as the built model says)."""
    layout = LAYOUTS[layout_name]
    target_state = model.state_dict()
    mapped, dropped, unmapped, misplaced, notes = {}, {}, [], [], []
    for key, value in state.items():
        target, reason = map_key(layout, key)
        if target is None:
            if reason is None:
                unmapped.append(key)
            else:
                dropped[key] = reason
            continue
        if target.startswith('CHECK:'):
            name = target[len('CHECK:'):]
            ours = dict(model.named_buffers()).get(name)
            if ours is not None and ours.is_meta:  # built without weights: compute it
                from mllm.models.projectors import sincos_2d
                grid = model.get_submodule(name.rpartition('.')[0]).query_grid
                ours = sincos_2d(ours.shape[1], grid, grid)
            if ours is None or ours.shape != value.shape or not torch.allclose(
                    ours.float(), value.float(), atol=1e-5):
                raise ValueError(f'{key} of the release differs from mllm\'s fixed {name} '
                                 '(another position-embedding table): its outputs would differ')
            dropped[key] = f'fixed table, equal to mllm\'s {name}'
            continue
        place = next((c for c in _candidates(target) if c in target_state), None)
        if place is None:
            misplaced.append(f'{key} -> {target}')
            continue
        mapped[place] = value
    problems = []
    if unmapped:
        problems.append(f'{len(unmapped)} tensors of the release match no rule of the '
                        f'{layout.name!r} layout: {_few(unmapped)}')
    if misplaced:
        problems.append(f'{len(misplaced)} tensors have no place in this model (another '
                        f'architecture or config?): {_few(misplaced)}')
    # the vocabulary: llava-hf adds <image> and <pad> rows (and pads to a multiple of 64)
    for key in [k for k in mapped if k.endswith(('embed_tokens.weight', 'lm_head.weight'))]:
        rows, want = mapped[key].shape[0], target_state[key].shape[0]
        if rows > want and mapped[key].shape[1:] == target_state[key].shape[1:]:
            notes.append(f'{key}: kept the first {want} of {rows} rows (the rows past the '
                         'tokenizer\'s vocabulary are tokens the release added, e.g. <image>)')
            mapped[key] = mapped[key][:want]
    wrong = [f'{k} {tuple(v.shape)} vs {tuple(target_state[k].shape)}' for k, v in mapped.items()
             if v.shape != target_state[k].shape]
    if wrong:
        problems.append(f'{len(wrong)} tensors have another shape in this model (release vs '
                        f'config): {_few(wrong)}')
    missing = [k for k in target_state if k not in mapped]
    if from_pretrained is None:
        from mllm.models.llava import weight_origin
        origins = {k: weight_origin(model, k) for k in missing}
    else:
        origins = {k: _weight_origin(model, k, from_pretrained) for k in missing}
    from_config = sorted({k.split('.')[0] for k in missing if origins[k] == 'pretrained'})
    uncovered = [k for k in missing if origins[k] != 'pretrained']
    required_missing = [k for k in missing if k.split('.')[0] in layout.required]
    uncovered = sorted(set(uncovered) | set(required_missing))
    if uncovered:
        parts = sorted({k.split('.')[0] for k in uncovered})
        problems.append(f'{len(uncovered)} tensors of the model ({", ".join(parts)}) get no '
                        f'weight from the release nor from a `pretrained` of the config: '
                        f'{_few(uncovered)}')
    if problems:
        raise ValueError(f'cannot import these weights as {layout.name!r} ({layout.what}):\n  - '
                         + '\n  - '.join(problems))
    notes += _check_release_config(layout, config or {}, model)
    return ImportResult(mapped, layout.name, dropped, from_config, notes)


def _check_release_config(layout: Layout, config: dict, model) -> List[str]:
    """Settings in the release's config.json that change outputs must equal the config's."""
    notes = []
    encoder = getattr(model, 'vision_encoder', None)
    release_layer = config.get('mm_vision_select_layer', config.get('vision_feature_layer'))
    if release_layer is not None and hasattr(encoder, 'select_layer') \
            and release_layer != encoder.select_layer:
        raise ValueError(f'the release reads vision layer {release_layer}, the config '
                         f'{encoder.select_layer} (set vision_encoder.select_layer='
                         f'{release_layer})')
    feature = config.get('mm_vision_select_feature')
    strategy = config.get('vision_feature_select_strategy')
    if strategy is not None:
        feature = {'default': 'patch', 'full': 'cls_patch'}.get(strategy, strategy)
    if feature is not None and hasattr(encoder, 'select_feature') \
            and feature != encoder.select_feature:
        raise ValueError(f"the release's vision features are {feature!r}, the config's "
                         f'{encoder.select_feature!r} (set vision_encoder.select_feature)')
    tower = config.get('mm_vision_tower')
    if tower and layout.name in ('llava', 'uhd'):
        notes.append(f'the release names its vision tower {tower!r}; its weights come from the '
                     "config's vision_encoder.pretrained (as LLaVA's builder loads them)")
    return notes


# ------------------------------------------------------------------ the command

def import_checkpoint(cfg, src: str, out: str, layout: Optional[str] = None) -> ImportResult:
    """Build ``cfg.model`` (on the meta device), map the release at ``src`` onto it and write
    ``out`` (+ ``out.sha256``)."""
    from mllm.models.meta import build_on_meta
    from mllm.engine.checkpoint import write_checksums

    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f'unknown layout {layout!r}; choose from {sorted(LAYOUTS)}')
    state, config = read_source(src)
    # names and shapes only: importing a 7B release needs neither its LLM base nor its
    # tower on disk (the run that loads OUT reads those)
    model = build_on_meta(cfg)
    layout = layout or detect_layout(state, config, model)
    result = map_state_dict(state, model, layout, config,
                            from_pretrained=pretrained_parts(cfg.model))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + '.partial'
    torch.save({'state_dict': {k: v.contiguous() for k, v in result.state.items()},
                'meta': {'trainable_only': True, 'imported_from': os.path.abspath(src),
                         'layout': layout}}, tmp)
    write_checksums(tmp, final_name=os.path.basename(out))
    os.replace(tmp, out)
    return result
