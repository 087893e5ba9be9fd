"""``mllm convert pth-to-hf CONFIG CHECKPOINT OUT_DIR``: a training checkpoint -> a
self-contained folder that ``mllm chat``, ``mllm eval`` and ``load_pretrained`` load without
the config (``--format mllm``, the default), or transformers' own
``LlavaForConditionalGeneration`` layout for plain LLaVA (``--format llava_hf``), or a folder
transformers loads with ``trust_remote_code=True`` for ConvLLaVA, MG-LLaVA (with object boxes)
and LLaVA-UHD (``--format remote_code``).

``mllm convert hf-to-pth CONFIG SRC OUT.pth``: the inverse, a released checkpoint (llava-hf,
original LLaVA-1.5 and its ``mm_projector.bin``, ConvLLaVA, MG-LLaVA, LLaVA-UHD) -> an mllm
checkpoint for ``--load-from`` / ``mllm chat --checkpoint`` (``mllm.inference.importers``).
XTuner's spellings ``pth_to_hf`` / ``hf_to_pth`` are aliases.

``mllm convert merge CONFIG CHECKPOINT OUT_DIR`` (XTuner's ``convert merge``, also in its form
``merge LLM_DIR ADAPTER_DIR OUT_DIR``): the LoRA merged into the LLM, as a transformers folder."""
import os

from mmengine.config import DictAction


def add_arguments(parser):
    sub = parser.add_subparsers(dest='conversion', metavar='CONVERSION', required=True)
    pth = sub.add_parser('pth-to-hf', aliases=['pth_to_hf'],
                         help='iter_N.pth of a config -> a Hugging Face folder')
    pth.add_argument('config')
    pth.add_argument('checkpoint')
    pth.add_argument('out_dir')
    pth.add_argument('--format', choices=['mllm', 'llava_hf', 'remote_code'], default='mllm',
                     help='mllm: every part, loadable by load_pretrained (default); llava_hf: '
                     'transformers LlavaForConditionalGeneration (CLIP + mlp2x_gelu only); '
                     'remote_code: transformers AutoModelForCausalLM with trust_remote_code '
                     '(ConvLLaVA, MG-LLaVA, LLaVA-UHD)')
    pth.add_argument('--keep-adapter', action='store_true',
                     help='save the LoRA adapter apart instead of merging it (mllm format)')
    pth.add_argument('--overwrite', action='store_true', help='write into a non-empty OUT_DIR')
    pth.add_argument('--trust-checkpoint', action='store_true',
                     help="CHECKPOINT is a third-party file you trust: load it with torch's full "
                     'unpickler if it needs it (that can run code stored in the file)')
    pth.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    from mllm.inference.importers import LAYOUTS
    imp = sub.add_parser('hf-to-pth', aliases=['hf_to_pth'],
                         help='released weights (llava-hf, LLaVA-1.5, ConvLLaVA, MG-LLaVA, '
                         'LLaVA-UHD) -> an mllm checkpoint for --load-from')
    imp.add_argument('config', help='the config whose model receives the weights')
    imp.add_argument('src', help='a released folder (config.json + safetensors / bin, sharded '
                     'or not) or one weights file (.safetensors, .bin, .pth)')
    imp.add_argument('out', help='the mllm checkpoint to write (OUT.pth, with OUT.pth.sha256)')
    imp.add_argument('--layout', choices=sorted(LAYOUTS),
                     help='the release\'s key layout; detected from its keys when left out')
    imp.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    imp.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    merge = sub.add_parser('merge', help="LoRA merged into the LLM (XTuner's `convert merge`) "
                           '-> a plain transformers LLM folder with the tokenizer')
    merge.add_argument('config', help='a LoRA config; or, as XTuner, the base LLM folder')
    merge.add_argument('checkpoint', help="the config's iter_N.pth; or a peft adapter folder "
                       '(`pth-to-hf --keep-adapter` writes one as llm_adapter/)')
    merge.add_argument('out_dir')
    merge.add_argument('--overwrite', action='store_true', help='write into a non-empty OUT_DIR')
    merge.add_argument('--trust-checkpoint', action='store_true',
                       help="CHECKPOINT is a third-party file you trust (see pth-to-hf)")
    merge.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def run(args) -> int:
    if args.conversion in ('hf-to-pth', 'hf_to_pth'):
        return run_import(args)
    if args.conversion == 'merge':
        return run_merge(args)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from mllm.engine.checkpoint import trust_checkpoint
    from mllm.engine.config import load_config
    from functools import partial

    from mllm.inference.export import (export_llava_hf, export_pretrained, export_remote_code,
                                       inference_settings)
    from mllm.inference.inference import load_model

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise FileExistsError(f'{args.out_dir} exists and is not empty (pass --overwrite)')
    if args.keep_adapter and args.format != 'mllm':
        raise ValueError(f'--keep-adapter needs --format mllm ({args.format} has no adapter)')
    if args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    cfg = load_config(args.config, args.cfg_options)
    model = load_model(cfg, args.checkpoint)
    if args.format == 'mllm':
        export_pretrained(cfg, args.out_dir, model=model, keep_adapter=args.keep_adapter,
                          overwrite=True)
    else:
        from mllm.datasets.tokenizers import build_tokenizer
        from mllm.registry import TRANSFORMS

        tokenizer_cfg, template, processor_cfg = inference_settings(cfg)
        if getattr(model.llm, 'merge_and_unload', None):
            model.llm = model.llm.merge_and_unload()
        export = export_llava_hf if args.format == 'llava_hf' else partial(export_remote_code, cfg)
        export(model, build_tokenizer(tokenizer_cfg), TRANSFORMS.build(processor_cfg),
               args.out_dir, template=template)
    print(f'exported {args.checkpoint} ({args.format} format) to {args.out_dir}')
    return 0


def run_import(args) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from mllm.engine.config import load_config
    from mllm.inference.importers import import_checkpoint

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f'{args.out} exists (pass --overwrite)')
    cfg = load_config(args.config, args.cfg_options)
    result = import_checkpoint(cfg, args.src, args.out, layout=args.layout)
    for note in result.notes:
        print(f'note: {note}')
    for reason in sorted(set(result.dropped.values())):
        keys = [k for k, r in result.dropped.items() if r == reason]
        print(f'not imported: {len(keys)} tensors ({keys[0]}, ...): {reason}')
    from_config = (f'; {", ".join(result.from_config)} from the config\'s pretrained weights'
                   if result.from_config else '')
    print(f'imported {len(result.state)} tensors of {args.src} ({result.layout} layout) into '
          f'{args.out}{from_config}')
    print(f'train from it: mllm train {args.config} --load-from {args.out}')
    return 0


def run_merge(args) -> int:
    """LoRA merged into the LLM (``merge_and_unload``: W + s·BA) and saved with
    ``save_pretrained`` next to the tokenizer, as XTuner's ``convert merge`` does."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise FileExistsError(f'{args.out_dir} exists and is not empty (pass --overwrite)')
    if os.path.isdir(args.config):  # XTuner's form: LLM folder + peft adapter folder
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(args.checkpoint, 'adapter_config.json')):
            raise FileNotFoundError(f'{args.checkpoint}: not a peft adapter folder (no '
                                    'adapter_config.json)')
        base = AutoModelForCausalLM.from_pretrained(args.config, dtype='auto',
                                                    local_files_only=True)
        llm = PeftModel.from_pretrained(base, args.checkpoint).merge_and_unload()
        # `pth-to-hf` keeps the tokenizer apart from llm/; a released LLM ships it inside
        has_tokenizer = os.path.isfile(os.path.join(args.config, 'tokenizer_config.json'))
        tokenizer = (AutoTokenizer.from_pretrained(args.config, local_files_only=True)
                     if has_tokenizer else None)
        if tokenizer is None:
            print(f'note: {args.config} holds no tokenizer: {args.out_dir} gets the weights only')
    else:
        from mllm.datasets.tokenizers import build_tokenizer
        from mllm.engine.checkpoint import trust_checkpoint
        from mllm.engine.config import load_config
        from mllm.inference.export import inference_settings
        from mllm.inference.inference import load_model

        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
        if args.trust_checkpoint:
            trust_checkpoint(args.checkpoint)
        cfg = load_config(args.config, args.cfg_options)
        model = load_model(cfg, args.checkpoint)
        if not hasattr(model.llm, 'merge_and_unload'):  # not a peft model
            raise ValueError(f'{args.config} trains no LoRA (model.lora is not set): nothing to '
                             'merge; `mllm convert pth-to-hf` exports the whole model')
        llm = model.llm.merge_and_unload()
        tokenizer = build_tokenizer(inference_settings(cfg)[0])
    llm.save_pretrained(args.out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out_dir)
    print(f'merged the LoRA of {args.checkpoint} into the LLM: {args.out_dir} '
          '(AutoModelForCausalLM.from_pretrained loads it)')
    return 0
