"""Export a trained model to a self-contained folder and load it back without the config.

``export_pretrained`` writes (``mllm convert pth-to-hf``)::

    OUT_DIR/
      mllm_config.json         model build config (paths relative to OUT_DIR), template name,
                               image-processor settings, which safetensors hold which part
      llm/                     the LLM, ``save_pretrained`` (LoRA merged), loadable by transformers
      llm_adapter/             only with keep_adapter: the peft adapter (llm/ is then the base LLM)
      vision_encoder/          the HF part of the vision encoder, ``save_pretrained``
      projector.safetensors    every other child module (projector, fusion, resampler, ...) and
                               any non-HF weights of the vision encoder
      tokenizer/               tokenizer files

``load_pretrained(OUT_DIR)`` returns ``(model, tokenizer, image_processor, template)``.
An exported folder never switches on ``trust_remote_code`` (running Python files that came
with it): the export leaves the key out, loading refuses a folder that sets it, and only the
loading user turns it on (``--trust-remote-code``; ``trust_remote_code=True`` in Python).
``export_llava_hf`` writes transformers' own ``LlavaForConditionalGeneration`` layout for
the plain LLaVA architecture (CLIP + 2-layer MLP projector), ``export_remote_code`` a folder
that transformers loads with ``trust_remote_code=True`` (ConvLLaVA, MG-LLaVA, LLaVA-UHD; the
modeling file from ``remote_code/`` is written next to the weights). Both carry a processor
(transformers' ``LlavaProcessor``; UHD's slicing processor from the modeling file) and the
training chat template as Jinja (``mllm.inference.chat_template``).
"""
import inspect
import json
import os
from typing import Optional, Tuple

MLLM_CONFIG = 'mllm_config.json'
FORMAT_VERSION = 1
LLM_DIR, ADAPTER_DIR, TOKENIZER_DIR = 'llm', 'llm_adapter', 'tokenizer'
REMOTE_CODE = 'trust_remote_code'


def inference_settings(cfg) -> Tuple[dict, str, dict]:
    """(tokenizer cfg, template name, image-processor cfg) as the training data used them.

    The dataset's own values win over the top-level keys (a pretraining recipe trains
    with 'plain' whatever the LLM base's chat template is).
    """
    loader = cfg.get('train_dataloader') or {}
    dataset = loader.get('dataset') or {}
    if dataset.get('type') == 'ConcatDataset':
        dataset = (dataset.get('datasets') or [{}])[0]
    settings = [dataset.get(key) or cfg.get(key)
                for key in ('tokenizer', 'template', 'image_processor')]
    missing = [k for k, v in zip(('tokenizer', 'template', 'image_processor'), settings) if not v]
    if missing:
        raise ValueError(f'the config sets no {missing} (neither top-level nor in '
                         'train_dataloader.dataset); the model cannot be prompted without them')
    tokenizer, template, processor = settings
    template = getattr(template, 'name', template)  # a ChatTemplate instance or its name
    return _plain(tokenizer), template, _plain(processor)


def _plain(value):
    """ConfigDicts, tuples and nested values as JSON-ready dicts and lists."""
    if hasattr(value, 'to_dict'):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _without_remote_code(value):
    """``value`` without any ``trust_remote_code`` key, at any depth."""
    if isinstance(value, dict):
        return {k: _without_remote_code(v) for k, v in value.items() if k != REMOTE_CODE}
    if isinstance(value, list):
        return [_without_remote_code(v) for v in value]
    return value


def _remote_code_settings(value, where: str = ''):
    """``(dotted key, value)`` of every ``trust_remote_code`` in ``value`` that is not false."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == REMOTE_CODE and item is not False:
                yield f'{where}{key}', item
            elif key != REMOTE_CODE:
                yield from _remote_code_settings(item, f'{where}{key}.')
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _remote_code_settings(item, f'{where}{i}.')


def _is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def _save_llm(model, model_cfg: dict, out_dir: str, keep_adapter: bool) -> None:
    """LLM -> ``llm/`` (LoRA merged into ``model.llm`` in place), or base + ``llm_adapter/``."""
    llm = model.llm
    if _is_peft(llm) and keep_adapter:
        llm.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))  # adapter weights + config only
        base = llm.get_base_model()
        # the base weights without the adapters: LoRA-wrapped linears keep theirs in base_layer
        state = {k.replace('.base_layer.', '.'): v for k, v in base.state_dict().items()
                 if 'lora_' not in k}
        base.save_pretrained(os.path.join(out_dir, LLM_DIR), state_dict=state)
    else:
        if _is_peft(llm):
            # NOTE: merging is exact math (W + s·BA) but changes model.llm; the merged LLM
            # replaces it, so the model stays valid and computes the same function.
            llm = model.llm = llm.merge_and_unload()
            model_cfg['lora'] = None
        llm.save_pretrained(os.path.join(out_dir, LLM_DIR))
    llm_cfg = model_cfg['llm']
    llm_cfg.pop('config', None)
    llm_cfg.update(pretrained=LLM_DIR, load_weights=True, quantization=None)


def _save_part(name: str, child, part_cfg: Optional[dict], out_dir: str) -> Optional[str]:
    """One non-LLM child: its HF model (``child.model``) with ``save_pretrained`` when its
    config follows the ``pretrained``/``config`` convention, everything else as safetensors."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    state = child.state_dict()
    hf_model = getattr(child, 'model', None)
    if (isinstance(hf_model, PreTrainedModel) and part_cfg is not None
            and ('pretrained' in part_cfg or 'config' in part_cfg)):
        hf_model.save_pretrained(os.path.join(out_dir, name))
        part_cfg.pop('config', None)
        part_cfg.update(pretrained=name, load_weights=True)
        state = {k: v for k, v in state.items() if not k.startswith('model.')}
    if not state:
        return None
    if part_cfg is not None and hasattr(child, 'weightless_cfg'):
        part_cfg.update(child.weightless_cfg())  # its weights are in the safetensors file
    filename = f'{name}.safetensors'
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              os.path.join(out_dir, filename))
    return filename


def export_pretrained(cfg, out_dir: str, checkpoint: Optional[str] = None, model=None,
                      keep_adapter: bool = False, overwrite: bool = False) -> str:
    """Write the self-contained folder described in the module docstring.

    Args:
        cfg: the training config (loaded with ``load_config``).
        out_dir: output folder; must be empty or absent unless ``overwrite``.
        checkpoint: ``iter_N.pth`` to load when ``model`` is None.
        model: an already built and loaded model. With LoRA and not ``keep_adapter``,
            its ``llm`` is replaced by the merged LLM (same outputs).
        keep_adapter: keep the LoRA adapter apart (``llm_adapter/``) instead of merging.
        overwrite: write into a non-empty ``out_dir``. Defaults to False.

    Returns:
        str: ``out_dir``.
    """
    from mllm.inference.loading import load_model
    from mllm.datasets.tokenizers import build_tokenizer

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f'{out_dir} exists and is not empty (choose another OUT_DIR)')
    tokenizer_cfg, template, processor_cfg = inference_settings(cfg)
    tokenizer = build_tokenizer(tokenizer_cfg)
    model = load_model(cfg, checkpoint) if model is None else model
    os.makedirs(out_dir, exist_ok=True)
    model_cfg = _plain(cfg.model)
    model_cfg['gradient_checkpointing'] = False
    # parts the config leaves to the model's defaults are written out, so a later change of
    # a default cannot change what an exported folder builds
    defaults = inspect.signature(type(model).__init__).parameters
    for name, _ in model.named_children():
        if name not in model_cfg and name in defaults and isinstance(defaults[name].default, dict):
            model_cfg[name] = dict(defaults[name].default)
    _save_llm(model, model_cfg, out_dir, keep_adapter)
    weights = {}
    for name, child in model.named_children():
        if name != 'llm' and (filename := _save_part(name, child, model_cfg.get(name), out_dir)):
            weights[name] = filename
    tokenizer.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    # the user who loads the folder decides about its code, not the folder (trust_remote_code)
    meta = _without_remote_code(dict(
        format_version=FORMAT_VERSION, model=model_cfg, weights=weights,
        tokenizer=dict(pretrained=TOKENIZER_DIR), template=template,
        image_processor=processor_cfg))
    with open(os.path.join(out_dir, MLLM_CONFIG), 'w') as f:
        json.dump(meta, f, indent=2)
    return out_dir


def read_export_config(out_dir: str) -> dict:
    """``mllm_config.json`` of an exported folder, with a clear error if it is not one."""
    path = os.path.join(out_dir, MLLM_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{out_dir} is not an exported model folder (no {MLLM_CONFIG}; '
                                'create one with `mllm convert pth-to-hf CONFIG CHECKPOINT OUT_DIR`)')
    with open(path) as f:
        meta = json.load(f)
    if meta.get('format_version') != FORMAT_VERSION:
        raise ValueError(f'{path}: format_version {meta.get("format_version")!r} is not '
                         f'{FORMAT_VERSION}; re-export it with this version of mllm')
    return meta


def _inside(out_dir: str, part: dict) -> dict:
    """A part config whose relative ``pretrained`` path is resolved against ``out_dir``."""
    pretrained = part.get('pretrained')
    if isinstance(pretrained, str) and not os.path.isabs(pretrained):
        part = dict(part, pretrained=os.path.join(out_dir, pretrained))
    return part


def load_pretrained(out_dir: str, trust_remote_code: bool = False):
    """Load an exported folder: ``(model, tokenizer, image_processor, template)``.

    The model is in eval mode on the CPU; no training config is needed::

        model, tokenizer, image_processor, template = load_pretrained('exports/tiny')

    ``trust_remote_code`` lets transformers import the Python files of the folder's LLM and
    tokenizer (their ``auto_map``); only the caller can turn it on. A ``mllm_config.json`` that
    sets it itself is refused.
    """
    from safetensors.torch import load_file

    from mllm.datasets.templates import get_template
    from mllm.datasets.tokenizers import build_tokenizer
    from mllm.registry import MODELS, TRANSFORMS

    meta = read_export_config(out_dir)
    settings = [f'{key}={json.dumps(value)}' for key, value in _remote_code_settings(meta)]
    if settings and not trust_remote_code:
        raise ValueError(
            f'{os.path.join(out_dir, MLLM_CONFIG)} sets {", ".join(settings)}: an exported '
            'folder may not switch on trust_remote_code (it would run Python files that came '
            'with the folder). If you trust its code, pass --trust-remote-code (mllm chat, mllm '
            'eval; trust_remote_code=True for load_pretrained and the lmms-eval model_args)')
    meta = _without_remote_code(meta)
    if trust_remote_code:
        meta['model']['llm'] = dict(meta['model']['llm'], trust_remote_code=True)
        meta['tokenizer'] = dict(meta['tokenizer'], trust_remote_code=True)
    model_cfg = {k: _inside(out_dir, v) if isinstance(v, dict) else v
                 for k, v in meta['model'].items()}
    model = MODELS.build(model_cfg)
    adapter = os.path.join(out_dir, ADAPTER_DIR)
    if os.path.isdir(adapter):
        from peft import load_peft_weights, set_peft_model_state_dict
        result = set_peft_model_state_dict(model.llm, load_peft_weights(adapter))
        if result.unexpected_keys:
            raise ValueError(f'{adapter} does not fit the LoRA config: unexpected '
                             f'{result.unexpected_keys[:5]}')
    for name, filename in meta['weights'].items():
        child = model.get_submodule(name)
        result = child.load_state_dict(load_file(os.path.join(out_dir, filename)), strict=False)
        # keys under `model.` came from the part's save_pretrained folder
        missing = [k for k in result.missing_keys if not k.startswith('model.')]
        if missing or result.unexpected_keys:
            raise ValueError(f'{os.path.join(out_dir, filename)} does not fit {name}: missing '
                             f'{missing[:5]}, unexpected {result.unexpected_keys[:5]}')
    tokenizer = build_tokenizer(_inside(out_dir, meta['tokenizer']))
    image_processor = TRANSFORMS.build(meta['image_processor'])
    return model.eval(), tokenizer, image_processor, get_template(meta['template'])


# ------------------------------------------------------------------ transformers' LLaVA layout

IMAGE_TOKEN_TEXT = '<image>'


def llava_hf_state_dict(model) -> dict:
    """Our state dict under ``LlavaForConditionalGeneration`` names (transformers 5 nests
    the towers and projector under ``model.``, the LLM's decoder as ``language_model``)."""
    import transformers
    prefixes = (('vision_encoder.model.', 'vision_tower.'),
                ('projector.', 'multi_modal_projector.'), ('llm.', 'language_model.'))
    if int(transformers.__version__.split('.')[0]) >= 5:
        prefixes = (('vision_encoder.model.', 'model.vision_tower.'),
                    ('projector.', 'model.multi_modal_projector.'),
                    ('llm.model.', 'model.language_model.'), ('llm.lm_head.', 'lm_head.'))
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in prefixes:
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = value
                break
        else:
            raise ValueError(f'{key} has no place in the transformers LLaVA layout')
    return state


def _check_plain_llava(model) -> None:
    from mllm.models.projectors import MLPProjector
    from mllm.models.vision import CLIPVisionEncoder

    problems = []
    if not isinstance(model.vision_encoder, CLIPVisionEncoder):
        problems.append(f'the vision encoder is {type(model.vision_encoder).__name__}, not CLIP')
    if not isinstance(model.projector, MLPProjector) or model.projector.depth != 2:
        problems.append('the projector is not a 2-layer MLP (mlp2x_gelu)')
    extra = {n for n, child in model.named_children() if child.state_dict()} - {
        'vision_encoder', 'projector', 'llm'}
    if extra:
        problems.append(f'it has parts transformers LLaVA lacks: {sorted(extra)}')
    if _is_peft(model.llm):
        problems.append('the LLM still has LoRA adapters (merge them first)')
    if problems:
        raise ValueError('--format llava_hf needs the plain LLaVA architecture (CLIP + '
                         'mlp2x_gelu): ' + '; '.join(problems) + '. Use --format mllm.')


def _hf_image_processor(image_processor):
    """transformers' ``LlavaImageProcessor`` set up as mllm's ``LLaVAImageProcessor``: pad to a
    square with the mean colour (LLaVA-1.5's expand2square), resize to size x size, no crop."""
    from transformers import LlavaImageProcessorPil

    if getattr(image_processor, 'keep_aspect', False):
        raise ValueError("transformers' LlavaProcessor needs square images (one token count "
                         'per image), but the image processor keeps the aspect ratio '
                         '(keep_aspect=True); use --format mllm')
    size = image_processor.size
    # NOTE: saved as 'LlavaImageProcessor'; AutoProcessor picks its torchvision backend by
    # default, whose bicubic resize differs from PIL's (ours) by up to ~0.03 after
    # normalisation; backend='pil' resizes as mllm does. No resize (an image already at
    # size x size after padding) gives equal pixels either way.
    return LlavaImageProcessorPil(
        do_pad=image_processor.pad_to_square, size={'height': size, 'width': size},
        do_center_crop=False, resample=3,  # PIL.Image.BICUBIC
        image_mean=image_processor.mean.flatten().tolist(),
        image_std=image_processor.std.flatten().tolist())


def _generation_config(tokenizer, template):
    """Defaults so a bare ``generate()`` stops at the template's end-of-turn token and pads
    with the tokenizer's pad token (no 'Setting pad_token_id to eos_token_id' warning)."""
    from transformers import GenerationConfig

    from mllm.datasets.templates import stop_token_id

    eos_id = stop_token_id(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                            pad_token_id=pad_id)


def export_llava_hf(model, tokenizer, image_processor, out_dir: str, template=None):
    """Write ``LlavaForConditionalGeneration`` + tokenizer + ``LlavaProcessor`` to ``out_dir``,
    so transformers' standard route (``AutoProcessor``, ``apply_chat_template``,
    ``processor(images=, text=)``, ``generate``) prompts the model as training did.

    The HF model marks image positions with a vocabulary token, not our -200 sentinel:
    ``<image>`` is added to the tokenizer if missing and the embeddings are resized when
    its id falls outside them. ``tokenizer`` is changed in place.

    Args:
        template: the training chat template (name or ChatTemplate). Written as a Jinja
            ``chat_template`` for processor and tokenizer (``mllm.inference.chat_template``,
            checked against mllm's prompt builder) with a generation config that stops at its
            end-of-turn token. None writes neither. Defaults to None.

    Returns:
        The ``LlavaForConditionalGeneration`` (its ``config.image_token_index`` is the id).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    _check_plain_llava(model)
    _hf_image_processor(image_processor)  # refuses what transformers LLaVA cannot do, early
    image_token_id, chat_template = _prepare_text_side(tokenizer, template)
    vision = model.vision_encoder
    size = image_processor.size
    config = LlavaConfig(
        vision_config=vision.model.config.to_dict(), text_config=model.llm.config.to_dict(),
        image_token_index=image_token_id, projector_hidden_act='gelu',
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy='default' if vision.select_feature == 'patch' else 'full',
        image_seq_length=vision.num_visual_tokens((size, size)))
    with no_init_weights():
        hf_model = LlavaForConditionalGeneration(config)
    hf_model.load_state_dict(llava_hf_state_dict(model), strict=True)
    if image_token_id >= hf_model.get_input_embeddings().num_embeddings:
        hf_model.resize_token_embeddings(image_token_id + 1)
    if template is not None:
        hf_model.generation_config = _generation_config(tokenizer, template)
    hf_model.eval().save_pretrained(out_dir)
    llava_hf_processor(model, tokenizer, image_processor, chat_template).save_pretrained(out_dir)
    return hf_model


def llava_hf_processor(model, tokenizer, image_processor, chat_template: Optional[str] = None):
    """The ``LlavaProcessor`` for ``model`` (a plain LLaVA): it inserts one ``<image>`` per
    image feature the model computes."""
    vision = model.vision_encoder
    # CLIP's sequence has a CLS token (+1) that strategy 'default' drops again (-1): the
    # processor then inserts (size / patch)^2 image tokens, one per feature
    return _llava_processor(tokenizer, image_processor, vision.patch_size, 1,
                            'default' if vision.select_feature == 'patch' else 'full',
                            chat_template)


def _llava_processor(tokenizer, image_processor, patch_size: int, additional_tokens: int,
                     strategy: str, chat_template: Optional[str]):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_hf_image_processor(image_processor), tokenizer=tokenizer,
        patch_size=patch_size, num_additional_image_tokens=additional_tokens,
        vision_feature_select_strategy=strategy, image_token=IMAGE_TOKEN_TEXT,
        chat_template=chat_template)


def _prepare_text_side(tokenizer, template) -> Tuple[int, Optional[str]]:
    """``<image>`` added to ``tokenizer`` (in place), no token_type_ids (no forward takes
    them), and the Jinja chat template checked against mllm's prompt builder.
    Returns (image token id, chat template or None)."""
    from mllm.inference.chat_template import fit_chat_template

    if IMAGE_TOKEN_TEXT not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN_TEXT], special_tokens=True)
    tokenizer.model_input_names = tokenizer.init_kwargs['model_input_names'] = [
        'input_ids', 'attention_mask']
    chat_template = None
    if template is not None:
        chat_template = fit_chat_template(template, tokenizer)
    tokenizer.chat_template = chat_template
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT), chat_template


# ------------------------------------------------------------------ transformers remote code

REMOTE_CODE_DIR = os.path.join(os.path.dirname(__file__), 'remote_code')
# architecture -> (modeling files written next to the weights, the one auto_map names,
# its config and model classes, its processor class or None for transformers' LlavaProcessor)
REMOTE_CODE_FILES = {
    'convllava': (['modeling_mllm_common', 'modeling_mllm_convllava'], 'modeling_mllm_convllava',
                  'MllmConvLlavaConfig', 'MllmConvLlavaForCausalLM', None),
    'mgllava': (['modeling_mllm_common', 'modeling_mllm_convllava', 'modeling_mllm_mgllava'],
                'modeling_mllm_mgllava', 'MllmMgLlavaConfig', 'MllmMgLlavaForCausalLM',
                'MllmMgLlavaProcessor'),
    'uhd': (['modeling_mllm_common', 'modeling_mllm_uhd'], 'modeling_mllm_uhd', 'MllmUhdConfig',
            'MllmUhdForCausalLM', 'MllmUhdProcessor'),
}


def _remote_code_kind(model, image_processor=None) -> str:
    """'convllava', 'mgllava' or 'uhd' for the architectures the remote code covers, else
    raises."""
    from mllm.datasets.slicing import UHDImageProcessor
    from mllm.models.convnext import ConvNeXtEncoder
    from mllm.models.fusion import ConvGateFusion
    from mllm.models.llava import LLaVAModel
    from mllm.models.mgllava import MGLLaVAModel
    from mllm.models.projectors import MLPProjector, Resampler
    from mllm.models.vision import CLIPVisionEncoder

    problems, kind = [], None
    if type(model) is LLaVAModel and isinstance(model.vision_encoder, ConvNeXtEncoder):
        kind = 'convllava'
    elif (type(model) is LLaVAModel and isinstance(model.vision_encoder, CLIPVisionEncoder)
          and isinstance(model.projector, Resampler)):
        kind = 'uhd'
        if not isinstance(image_processor, UHDImageProcessor):
            problems.append(f'the image processor is {type(image_processor).__name__}, not '
                            'the UHDImageProcessor the resampler was trained with')
        elif image_processor.tokens_per_unit not in (None, model.projector.num_queries):
            problems.append(f'the image processor reserves {image_processor.tokens_per_unit} '
                            f'tokens per slice, the resampler makes {model.projector.num_queries}')
        if model.vision_encoder.select_feature != 'patch':
            problems.append("the vision encoder's select_feature is not 'patch'")
    elif type(model) is MGLLaVAModel and isinstance(model.vision_encoder, CLIPVisionEncoder):
        kind = 'mgllava'
        if not isinstance(model.fusion, ConvGateFusion) or model.fusion.resize_high:
            problems.append('the fusion is not a ConvGateFusion on matching grids')
        if not isinstance(model.bbox_projector, MLPProjector):
            problems.append('the bbox projector is not an MLP')
    else:
        problems.append(f'the model is {type(model).__name__} with a '
                        f'{type(model.vision_encoder).__name__}')
    if kind != 'uhd' and not isinstance(model.projector, MLPProjector):
        problems.append(f'the projector is {type(model.projector).__name__}, not an MLP')
    if _is_peft(model.llm):
        problems.append('the LLM still has LoRA adapters (merge them first)')
    if problems:
        raise ValueError('--format remote_code covers ConvLLaVA (LLaVAModel + ConvNeXtEncoder), '
                         'MG-LLaVA (MGLLaVAModel) and LLaVA-UHD (LLaVAModel + CLIP + Resampler, '
                         'UHDImageProcessor) so far: ' + '; '.join(problems)
                         + '. Use --format mllm.')
    return kind


def _convnext_config(encoder, encoder_cfg: dict) -> dict:
    """What ``modeling_mllm_convllava.ConvNeXtTower`` builds the same ConvNeXt from."""
    return dict(backend=encoder.backend, hf_config=encoder.weightless_cfg()['config'],
                model_name=encoder_cfg.get('model_name'),
                model_kwargs=encoder_cfg.get('model_kwargs'),
                extra_stage=encoder_cfg.get('extra_stage'))


def _remote_config(kind: str, cfg, model, image_token_id: int) -> dict:
    """The custom config's fields for ``kind``."""
    fields = dict(text_config=model.llm.config.to_dict(), image_token_index=image_token_id)
    if kind == 'uhd':
        resampler = model.projector
        return dict(fields, clip_config=model.vision_encoder.model.config.to_dict(),
                    select_layer=model.vision_encoder.select_layer,
                    resampler_config=dict(num_queries=resampler.num_queries,
                                          embed_dim=resampler.query.shape[1],
                                          num_heads=resampler.attn.num_heads,
                                          eps=resampler.ln_q.eps))
    fields['projector_depth'] = model.projector.depth
    model_cfg = _plain(cfg.model)
    if kind == 'convllava':
        return dict(fields, vision_config=_convnext_config(model.vision_encoder,
                                                           model_cfg['vision_encoder']))
    return dict(fields, clip_config=model.vision_encoder.model.config.to_dict(),
                select_layer=model.vision_encoder.select_layer,
                vision_config=_convnext_config(model.high_res_encoder,
                                               model_cfg['high_res_encoder']),
                gate_channels=model.fusion.gate[0].out_features,
                bbox_projector_depth=model.bbox_projector.depth,
                bbox_in_channels=model.bbox_projector.linear_1.in_features,
                box_pool_size=model.box_pool_size, box_grid_stage=model.box_grid_stage)


def _grid_stride(kind: str, model) -> int:
    """Pixels per visual token of the ConvNeXt grid (ConvLLaVA's tower, MG-LLaVA's
    high-resolution one)."""
    return (model.vision_encoder if kind == 'convllava' else model.high_res_encoder).stride


def _remote_processor(kind: str, remote, model, tokenizer, image_processor,
                      chat_template: Optional[str]):
    """The processor the folder carries: transformers' ``LlavaProcessor`` (ConvLLaVA; MG-LLaVA
    with its box-taking subclass in ``auto_map``, for ``trust_remote_code=True``) or the
    modeling file's UHD slicing processor."""
    from mllm.datasets.slicing import resolve_token_id

    processor_class = REMOTE_CODE_FILES[kind][4]
    if kind == 'uhd':
        processor = getattr(remote, processor_class)(
            tokenizer=tokenizer, chat_template=chat_template, base=image_processor.base,
            patch=image_processor.patch, max_slices=image_processor.max_slices,
            tokens_per_unit=model.projector.num_queries, image_mean=list(image_processor.mean),
            image_std=list(image_processor.std), variant=image_processor.variant,
            separator_ids=[resolve_token_id(tokenizer, t) for t in image_processor.separators],
            image_token=IMAGE_TOKEN_TEXT)
    else:
        # no CLS token in the grid: 'full' and +0 give (size / stride)^2 tokens
        processor = _llava_processor(tokenizer, image_processor, _grid_stride(kind, model), 0,
                                     'full', chat_template)
    if processor_class is not None:
        # processor_class stays LlavaProcessor for MG-LLaVA: without trust_remote_code
        # AutoProcessor still gives transformers' own
        processor.auto_map = {'AutoProcessor': f'{REMOTE_CODE_FILES[kind][1]}.{processor_class}'}
    return processor


def export_remote_code(cfg, model, tokenizer, image_processor, out_dir: str, template=None):
    """Write a folder that plain transformers loads with ``trust_remote_code=True``:
    ``config.json`` (its ``auto_map`` names the modeling file of ``remote_code/``, written next
    to the weights; it needs torch, transformers and timm/open_clip, not mllm), mllm's state
    dict as ``model.safetensors``, the generation config, and the processor + tokenizer with
    the training chat template: transformers' own ``LlavaProcessor`` (ConvLLaVA, MG-LLaVA;
    with ``trust_remote_code=True`` MG-LLaVA's subclass, which takes object ``boxes=``) or
    LLaVA-UHD's slicing processor (slices + overview, separators as ids).

    ``model.llm`` gets a row for ``<image>`` when the tokenizer needs a new id (in place).
    """
    import importlib
    import shutil

    from safetensors.torch import save_file

    kind = _remote_code_kind(model, image_processor)
    if kind != 'uhd':
        stride = _grid_stride(kind, model)
        if image_processor is not None and image_processor.token_stride != stride:
            raise ValueError('the image processor reserves one token per '
                             f'{image_processor.token_stride} px but the encoder has stride '
                             f'{stride}')
    image_token_id, chat_template = _prepare_text_side(tokenizer, template)
    if image_token_id >= model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(image_token_id + 1)
    files, main, config_class, model_class, _ = REMOTE_CODE_FILES[kind]
    remote = importlib.import_module(f'mllm.inference.remote_code.{main}')
    config = getattr(remote, config_class)(**_remote_config(kind, cfg, model, image_token_id))
    config.architectures = [model_class]
    config.auto_map = {'AutoConfig': f'{main}.{config_class}',
                       'AutoModelForCausalLM': f'{main}.{model_class}'}
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    for name in files:
        shutil.copy(os.path.join(REMOTE_CODE_DIR, f'{name}.py'), out_dir)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
    if template is not None:
        _generation_config(tokenizer, template).save_pretrained(out_dir)
    _remote_processor(kind, remote, model, tokenizer, image_processor,
                      chat_template).save_pretrained(out_dir)
    return out_dir
