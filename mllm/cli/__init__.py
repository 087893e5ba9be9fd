"""The ``mllm`` command: one module per subcommand, imported only when it runs.

A failure prints one line, ``mllm COMMAND: error: REASON``, and exits 1; ``--debug`` (anywhere
on the command line) or ``MLLM_DEBUG=1`` prints the traceback as well.
"""
import argparse
import difflib
import importlib
import importlib.util
import os
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
    'convert': ('mllm.cli.convert', 'import released weights, export to HF, merge LoRA'),
    'eval': ('mllm.cli.eval', 'evaluate a model on a benchmark file (MMBench, POPE, ...)'),
    'plot': ('mllm.cli.plot', 'loss / lr / grad-norm / throughput curves of training runs'),
    'annotate-boxes': ('mllm.cli.annotate_boxes', 'object boxes for MG-LLaVA from a local OWLv2 detector'),
    'bench': ('mllm.cli.bench', 'throughput vs stock XTuner, data pipeline, memory, GPU step'),
    'sweep': ('mllm.cli.sweep', 'one recipe over several LLMs / values: pre-flight, runs, report'),
}


def user_errors() -> tuple:
    """Exceptions that report a mistake in the input (a path, a config, a data file, a
    checkpoint, a missing package): their message is the whole story."""
    from mllm.engine.config import ConfigError
    errors = [OSError, ValueError, ImportError, ConfigError]
    for module, name in (('mllm.engine.checkpoint', 'CheckpointError'),
                         ('mllm.engine.optim_wrappers', 'NonFiniteLossError'),
                         ('mllm.sweep.sweep', 'SweepError')):
        loaded = sys.modules.get(module)  # one not imported cannot have raised
        if loaded is not None and hasattr(loaded, name):
            errors.append(getattr(loaded, name))
    return tuple(errors)


def raised_by_mllm(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` in mllm's own code (its innermost frame)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package)


def is_user_error(err: BaseException) -> bool:
    """A user error prints its reason only. mllm also raises RuntimeError / KeyError with
    a reason meant for the user (``--resume auto`` finds nothing, an unknown template); the
    same types raised inside a library or by Python are probably bugs."""
    return isinstance(err, user_errors()) or (isinstance(err, (RuntimeError, KeyError))
                                              and raised_by_mllm(err))


def report_error(command: str, err: Exception, debug: bool) -> None:
    """One line on stderr (after the traceback with ``debug``); an unexpected error gets its
    type and a second line pointing to ``--debug``."""
    if debug:
        traceback.print_exc()
    message = str(err.args[0] if type(err) is KeyError and len(err.args) == 1 else err)
    if is_user_error(err) and message:
        print(f'mllm {command}: error: {message}', file=sys.stderr)
        return
    print(f'mllm {command}: error: {type(err).__name__}: {message}', file=sys.stderr)
    if not debug:
        print(f'mllm {command}: an unexpected error, probably a bug: rerun with --debug '
              '(or MLLM_DEBUG=1) for the traceback', file=sys.stderr)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as package_version
    try:
        return package_version('mllm')
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return 'unknown (not installed; `pip install -e .`)'


def resolve_command(name: str):
    """The command ``name`` names: itself, or its spelling with ``_`` for ``-`` (XTuner's
    commands mix both)."""
    for candidate in (name, name.replace('_', '-')):
        if candidate in COMMANDS:
            return candidate
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='mllm', description='Config-driven training of multimodal LLMs (LLaVA-1.5, '
        'LLaVA-Med, ConvLLaVA, MG-LLaVA, LLaVA-UHD) on XTuner and MMEngine.',
        epilog="`mllm help COMMAND` (or `mllm COMMAND --help`) shows a command's options. "
        'A failure prints one line; --debug or MLLM_DEBUG=1 adds the traceback.')
    parser.add_argument('--version', action='version', version=f'mllm {version()}')
    parser.add_argument('--debug', action='store_true',
                        help='show the traceback of an error (also MLLM_DEBUG=1)')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug anywhere before a `--`: it is ours, not the subcommand's
    end = argv.index('--') if '--' in argv else len(argv)
    debug = '--debug' in argv[:end] or os.environ.get('MLLM_DEBUG', '') not in ('', '0')
    argv = [a for a in argv[:end] if a != '--debug'] + argv[end:]
    if debug:
        os.environ['MLLM_DEBUG'] = '1'  # for the subprocesses (torchrun, demo's trainings)
    if argv[:1] == ['help']:  # `mllm help CMD` is `mllm CMD --help`
        argv = argv[1:2] + ['--help'] if argv[1:] else ['--help']
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in ('-h', '--help', '--version'):
        try:
            parser.parse_args(argv[:1])
        except SystemExit as exit_:
            return exit_.code
    command = resolve_command(argv[0])
    if command is None:
        hint = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"mllm: error: unknown command {argv[0]!r}"
              + (f" (did you mean '{hint[0]}'?)" if hint else '')
              + "; `mllm --help` lists the commands", file=sys.stderr)
        return 2
    if importlib.util.find_spec(COMMANDS[command][0]) is None:
        print(f'mllm: error: {command} is not available in this version', file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        command_parser = argparse.ArgumentParser(prog=f'mllm {command}',
                                                 description=COMMANDS[command][1])
        module.add_arguments(command_parser)
        try:
            args = command_parser.parse_args(argv[1:])
        except SystemExit as exit_:  # usage errors (2) and --help (0) return, not raise
            return exit_.code
        return module.run(args) or 0
    except KeyboardInterrupt:
        print('mllm: interrupted', file=sys.stderr)
        return 130
    except Exception as err:  # every failure is reported and gives a non-zero exit
        report_error(command, err, debug)
        return 1
