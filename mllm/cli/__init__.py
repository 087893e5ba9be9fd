"""The ``mllm`` command: one module per subcommand, imported only when it runs."""
import argparse
import importlib
import importlib.util
import sys
import traceback

# subcommand -> (module, one-line help)
COMMANDS = {
    'train': ('mllm.cli.train', 'train a config (MMEngine runner, XTuner loop, optional DeepSpeed)'),
    'inspect': ('mllm.cli.inspect', 'parameter and visual-token counts, built on the meta device'),
    'check-data': ('mllm.cli.check_data', 'validate every sample of a config\'s data'),
    'list-cfg': ('mllm.cli.list_cfg', 'list the shipped configs'),
    'copy-cfg': ('mllm.cli.copy_cfg', 'copy a shipped config to edit it'),
    'print-config': ('mllm.cli.print_config', 'print the merged config after overrides'),
    'demo': ('mllm.cli.demo', 'synthetic data -> tiny LLaVA vs blind baseline -> results table'),
    'plan': ('mllm.cli.plan', 'per-GPU memory estimate for each ZeRO stage'),
    'chat': ('mllm.cli.chat', 'talk to a trained model about an image'),
    'convert': ('mllm.cli.convert', 'export a checkpoint to a self-contained Hugging Face folder'),
    'eval': ('mllm.cli.eval', 'evaluate a model on a benchmark file (MMBench, POPE, ...)'),
    'plot': ('mllm.cli.plot', 'loss / lr / grad-norm / throughput curves of training runs'),
    'annotate-boxes': ('mllm.cli.annotate_boxes', 'object boxes for MG-LLaVA from a local OWLv2 detector'),
    'bench': ('mllm.cli.bench', 'throughput vs stock XTuner, data pipeline, memory, GPU step'),
    'sweep': ('mllm.cli.sweep', 'one recipe over several LLMs / values: pre-flight, runs, report'),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='mllm', description=__doc__)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and importlib.util.find_spec(COMMANDS[argv[0]][0]) is None:
        print(f'mllm: {argv[0]} is not available in this version', file=sys.stderr)
        return 2
    if not argv or argv[0] not in COMMANDS:
        parser.print_help(sys.stderr if argv else sys.stdout)
        if argv and argv[0] not in ('-h', '--help'):
            print(f'\nmllm: unknown command {argv[0]!r}', file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = argparse.ArgumentParser(prog=f'mllm {argv[0]}',
                                             description=COMMANDS[argv[0]][1])
    module.add_arguments(command_parser)
    try:
        args = command_parser.parse_args(argv[1:])
    except SystemExit as exit_:  # usage errors (2) and --help (0) return, not raise
        return exit_.code
    try:
        return module.run(args) or 0
    except KeyboardInterrupt:
        print('mllm: interrupted', file=sys.stderr)
        return 130
    except Exception as err:  # every failure is shown and gives a non-zero exit
        traceback.print_exc()
        print(f'\nmllm {argv[0]}: error: {err}', file=sys.stderr)
        return 1
