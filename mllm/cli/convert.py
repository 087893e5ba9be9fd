"""``mllm convert pth-to-hf CONFIG CHECKPOINT OUT_DIR``: a training checkpoint -> a
self-contained folder that ``mllm chat``, ``mllm eval`` and ``load_pretrained`` load without
the config (``--format mllm``, the default), or transformers' own
``LlavaForConditionalGeneration`` layout for plain LLaVA (``--format llava_hf``)."""
import os

from mmengine.config import DictAction


def add_arguments(parser):
    sub = parser.add_subparsers(dest='conversion', metavar='CONVERSION', required=True)
    pth = sub.add_parser('pth-to-hf', help='iter_N.pth of a config -> a Hugging Face folder')
    pth.add_argument('config')
    pth.add_argument('checkpoint')
    pth.add_argument('out_dir')
    pth.add_argument('--format', choices=['mllm', 'llava_hf'], default='mllm',
                     help='mllm: every part, loadable by load_pretrained (default); llava_hf: '
                     'transformers LlavaForConditionalGeneration (CLIP + mlp2x_gelu only)')
    pth.add_argument('--keep-adapter', action='store_true',
                     help='save the LoRA adapter apart instead of merging it (mllm format)')
    pth.add_argument('--overwrite', action='store_true', help='write into a non-empty OUT_DIR')
    pth.add_argument('--trust-checkpoint', action='store_true',
                     help="CHECKPOINT is a third-party file you trust: load it with torch's full "
                     'unpickler if it needs it (that can run code stored in the file)')
    pth.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def run(args) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from mllm.engine.checkpoint import trust_checkpoint
    from mllm.engine.config import load_config
    from mllm.inference.export import export_llava_hf, export_pretrained, inference_settings
    from mllm.inference.inference import load_model

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise FileExistsError(f'{args.out_dir} exists and is not empty (pass --overwrite)')
    if args.keep_adapter and args.format == 'llava_hf':
        raise ValueError('--keep-adapter needs --format mllm (transformers LLaVA has no adapter)')
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

        tokenizer_cfg, _, processor_cfg = inference_settings(cfg)
        if getattr(model.llm, 'merge_and_unload', None):
            model.llm = model.llm.merge_and_unload()
        export_llava_hf(model, build_tokenizer(tokenizer_cfg), TRANSFORMS.build(processor_cfg),
                        args.out_dir)
    print(f'exported {args.checkpoint} ({args.format} format) to {args.out_dir}')
    return 0
