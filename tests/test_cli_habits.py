"""The `mllm` command's habits (issue 19 item 4): one-line errors (traceback with --debug or
MLLM_DEBUG=1), help on stdout, --version, "did you mean", XTuner's spellings (`convert
pth_to_hf`, `convert merge`), check-data with --data / --show / a progress bar, `plan`'s
argument checks, nested --cfg-options keys and copy-cfg's relocatable copy. The demo's progress
lines are checked by test_cli.py::test_mini_demo_pipeline (it runs the demo anyway)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.cli import main
from mllm.engine.config import ConfigError, find_config, load_config
from helpers import REPO, TINY, run_mllm


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from mllm.datasets.synthetic import generate_synthetic_vqa
    return generate_synthetic_vqa(str(tmp_path_factory.mktemp('synthetic')), num_train=24,
                                  num_val=4)


def stderr_lines(result):
    """stderr without the one library line DeepSpeed prints on import."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and 'real_accelerator.py' not in line]


# ---------------------------------------------------------------- errors, help, version

def test_user_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv('MLLM_DEBUG', '')  # (subprocesses inherit the environment)
    result = run_mllm('copy-cfg', 'tiny_lava_synthetic', 'x.py')
    assert result.returncode == 1
    assert stderr_lines(result) == [
        f'mllm copy-cfg: error: config not found: tiny_lava_synthetic (neither a file nor a '
        f"name under {REPO}/configs) (did you mean 'tiny_llava_synthetic' or "
        "'tiny_mgllava_synthetic' or 'tiny_convllava_synthetic'?)"]
    debug = run_mllm('copy-cfg', 'tiny_lava_synthetic', 'x.py', '--debug')
    assert debug.returncode == 1 and 'Traceback (most recent call last)' in debug.stderr
    assert stderr_lines(debug)[-1] == stderr_lines(result)[0]
    # the same in-process, with the environment variable instead of the flag
    args = ['print-config', TINY, '--cfg-options', 'train_cfg.max_iter=3']
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("mllm print-config: error: --cfg-options train_cfg.max_iter: train_cfg "
                          "has no key 'max_iter' (did you mean 'max_iters'?) (it has: max_iters")
    assert err.endswith('prefix the key with + to add a new one)\n') and err.count('\n') == 1
    monkeypatch.setenv('MLLM_DEBUG', '1')
    assert main(args) == 1
    assert 'Traceback (most recent call last)' in capsys.readouterr().err


def test_unexpected_error_names_its_type_and_points_to_debug():
    """A bug (an exception that is not an input mistake) still gets one line, its type and
    the way to the traceback; the exit code is 1."""
    pre = 'import mllm.cli.list_cfg as m\nm.run = lambda args: 1 / 0'
    result = run_mllm('list-cfg', pre=pre, env={'MLLM_DEBUG': ''})
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert stderr_lines(result) == [
        'mllm list-cfg: error: ZeroDivisionError: division by zero',
        'mllm list-cfg: an unexpected error, probably a bug: rerun with --debug (or '
        'MLLM_DEBUG=1) for the traceback']
    assert 'Traceback' in run_mllm('list-cfg', '--debug', pre=pre).stderr


def test_reasons_mllm_raises_as_runtime_or_key_errors_are_user_errors(synthetic, capsys):
    """mllm's own `raise KeyError(reason)` is a message for the user, not a bug."""
    assert main(['check-data', TINY, '--cfg-options', 'template=vicuna_v9',
                 f'tokenizer.pretrained={synthetic["tokenizer"]}']) == 1
    err = capsys.readouterr().err
    assert err.startswith("mllm check-data: error: unknown chat template 'vicuna_v9'; known: [")
    assert err.count('\n') == 1 and 'KeyError' not in err


def test_config_names_get_suggestions(capsys):
    assert main(['train', 'llava15_vicuna7b_finetun']) == 1
    assert capsys.readouterr().err == (
        f'mllm train: error: config not found: llava15_vicuna7b_finetun (neither a file nor a '
        f"name under {REPO}/configs) (did you mean 'llava15_vicuna7b_finetune' or "
        "'llava15_vicuna13b_finetune' or 'mgllava_vicuna7b_finetune'?)\n")
    with pytest.raises(FileNotFoundError, match='see `mllm list-cfg`'):
        find_config('zzzz')  # nothing close: the listing command instead


def test_help_on_stdout_version_and_did_you_mean():
    from importlib.metadata import version

    result = subprocess.run([sys.executable, '-m', 'mllm', '--help'], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0 and result.stderr == ''  # `mllm --help | less` shows it
    assert 'usage: mllm' in result.stdout and 'check-data' in result.stdout
    assert '--debug' in result.stdout and '--version' in result.stdout
    result = run_mllm('--version')
    assert (result.returncode, result.stdout) == (0, f'mllm {version("mllm")}\n')
    result = run_mllm('trian')
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == ("mllm: error: unknown command 'trian' (did you mean 'train'?); "
                             '`mllm --help` lists the commands\n')
    result = run_mllm('help', 'copy_cfg')  # `help CMD`; XTuner-style underscores
    assert result.returncode == 0 and result.stdout.startswith('usage: mllm copy-cfg')


# ---------------------------------------------------------------- --cfg-options

def test_nested_override_keys_are_checked_when_the_config_loads(capsys):
    with pytest.raises(ConfigError, match=r"train_cfg has no key 'max_iter' \(did you mean "
                                          r"'max_iters'\?\)"):
        load_config(TINY, {'train_cfg.max_iter': 3})
    with pytest.raises(ConfigError, match=r"default_hooks has no key 'loggr' \(did you mean "
                                          r"'logger'\?\)"):
        load_config(TINY, {'default_hooks.loggr.interval': 1})
    with pytest.raises(ConfigError, match=r"optim_wrapper.optimizer has no key 'lrr'"):
        load_config(TINY, {'optim_wrapper.optimizer.lrr': 1e-3})
    with pytest.raises(ConfigError, match=r"param_scheduler is a list of 2; '5' is not an index"):
        load_config(TINY, {'param_scheduler.5.end': 10})
    with pytest.raises(ConfigError, match="model has no key 'foo'"):
        load_config(TINY, {'model.foo': 1})
    # `+` adds a key on purpose (Hydra's spelling)
    assert load_config(TINY, {'+model.foo': 1}).model.foo == 1
    assert main(['print-config', TINY, '--cfg-options', '+model.foo=1']) == 0
    assert 'foo=1,' in capsys.readouterr().out
    # new keys a component takes as an argument, and keys of keyword bags, are accepted
    cfg = load_config(TINY, {'train_dataloader.dataset.blank_images': True,
                             'train_cfg.val_interval': 5, 'train_dataloader.pin_memory': True,
                             'llm.config.attention_dropout': 0.1, 'model.lora.r': 4})
    assert cfg.train_dataloader.dataset.blank_images and cfg.model.lora == dict(r=4)
    assert cfg.model.llm.config.attention_dropout == 0.1 and cfg.train_cfg.val_interval == 5
    with pytest.raises(ConfigError, match="lora has no key 'rank'"):
        load_config('llava15_vicuna7b_finetune_lora', {'model.lora.rank': 4})


# ---------------------------------------------------------------- check-data

def write_samples(tmp_path, synthetic, bad_at=()):
    """The first 6 synthetic samples (relative image paths) as a new file; the samples at
    ``bad_at`` point at missing images."""
    with open(synthetic['train']) as f:
        samples = json.load(f)[:6]
    for index in bad_at:
        samples[index]['image'] = f'train/missing_{index}.png'
    path = tmp_path / 'mine.json'
    path.write_text(json.dumps(samples))
    return str(path)


def data_options(synthetic):
    return ['--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}',
            f'train_dataloader.dataset.image_folder={synthetic["image_folder"]}']


def test_check_data_with_data_keeps_the_config_image_folder(tmp_path, synthetic, capsys):
    path = write_samples(tmp_path, synthetic)
    assert main(['check-data', TINY, '--data', path, *data_options(synthetic)]) == 0
    assert capsys.readouterr().out.strip() == f'checked 6 samples of {path}: 0 problem(s)'


def test_check_data_show_lists_every_bad_sample(tmp_path, synthetic, capsys):
    path = write_samples(tmp_path, synthetic, bad_at=(1, 4))
    assert main(['check-data', TINY, '--data', path, '--show', '3',
                 *data_options(synthetic)]) == 1
    out, err = capsys.readouterr()
    assert out.count('input_ids:') == 2 and 'not shown: see its problem below' in out
    assert 'index 1 (id train_000001): image not found' in err
    assert 'index 4 (id train_000004): image not found' in err
    assert out.strip().endswith(f'checked 6 samples of {path}: 2 problem(s)')


def test_check_data_progress_bar_on_a_terminal(tmp_path, synthetic, capsys, monkeypatch):
    path = write_samples(tmp_path, synthetic)
    assert main(['check-data', TINY, '--data', path, '--json', *data_options(synthetic)]) == 0
    assert 'checking' not in capsys.readouterr().err  # no bar in a log or a pipe
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    assert main(['check-data', TINY, '--data', path, '--json', *data_options(synthetic)]) == 0
    out, err = capsys.readouterr()
    assert 'checking:' in err and '/6 [' in err  # tqdm's bar (erased when done)
    assert json.loads(out) == dict(file=path, samples=6, problems=0)  # stdout stays JSON


# ---------------------------------------------------------------- plan, copy-cfg, demo

@pytest.mark.parametrize('option', [['--gpus', '0'], ['--gpu-mem', '-1'], ['--seq-len', '0']])
def test_plan_validates_its_arguments(option):
    result = run_mllm('plan', TINY, *option)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f'mllm plan: error: argument {option[0]}: must be' in result.stderr


@pytest.mark.parametrize('name', ['tiny_convllava_synthetic_stage3', 'llava15_vicuna7b_finetune'])
def test_copy_cfg_into_a_new_folder_loads_where_it_lands(name, tmp_path, capsys):
    dest = tmp_path / 'new' / 'deeper'
    assert main(['copy-cfg', name, str(dest) + os.sep]) == 0
    copied = dest / f'{name}.py'
    assert copied.is_file()
    # print-config from another folder, through the real command
    result = subprocess.run([sys.executable, '-m', 'mllm', 'print-config', str(copied)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == load_config(name).pretty_text + '\n'
    assert main(['copy-cfg', name, str(dest)]) == 1  # no overwrite
    assert 'exists; not overwriting it' in capsys.readouterr().err


# ---------------------------------------------------------------- convert merge

LORA_CONFIG = """_base_ = ['{tiny}']
model = dict(lora=dict(r=4, alpha=8, dropout=0.0))
"""


def test_convert_merge_writes_an_llm_with_the_same_logits(tmp_path, synthetic):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllm.registry import MODELS

    config = tmp_path / 'tiny_lora.py'
    config.write_text(LORA_CONFIG.format(tiny=TINY))
    options = ['--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}']
    cfg = load_config(str(config), {'tokenizer.pretrained': synthetic['tokenizer']})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter something to merge
        for name, param in model.llm.named_parameters():
            if 'lora_B' in name:
                param.normal_(0, 0.05)
    checkpoint = tmp_path / 'iter_1.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    with torch.no_grad():
        expected = model.llm(input_ids=ids).logits
        with model.llm.disable_adapter():  # the adapter does change the logits
            assert (model.llm(input_ids=ids).logits - expected).abs().max() > 1e-3

    out = tmp_path / 'merged'
    result = run_mllm('convert', 'merge', str(config), str(checkpoint), str(out), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any('lora' in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-5
    assert AutoTokenizer.from_pretrained(out).get_vocab() == \
        AutoTokenizer.from_pretrained(synthetic['tokenizer']).get_vocab()

    # XTuner's form: base LLM folder + adapter folder (as `pth_to_hf --keep-adapter` writes)
    export = tmp_path / 'export'
    assert main(['convert', 'pth_to_hf', str(config), str(checkpoint), str(export),
                 '--keep-adapter', *options]) == 0
    assert main(['convert', 'merge', str(export / 'llm'), str(export / 'llm_adapter'),
                 str(tmp_path / 'merged2')]) == 0
    merged2 = AutoModelForCausalLM.from_pretrained(tmp_path / 'merged2').eval()
    with torch.no_grad():
        assert (merged2(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_convert_merge_refuses_a_config_without_lora(tmp_path, synthetic, capsys):
    from mllm.registry import MODELS

    cfg = load_config(TINY, {'tokenizer.pretrained': synthetic['tokenizer']})
    checkpoint = tmp_path / 'iter_1.pth'
    torch.save(dict(state_dict=MODELS.build(cfg.model).state_dict()), checkpoint)
    assert main(['convert', 'merge', TINY, str(checkpoint), str(tmp_path / 'out'),
                 '--cfg-options', f'tokenizer.pretrained={synthetic["tokenizer"]}']) == 1
    assert 'trains no LoRA (model.lora is not set): nothing to merge' in capsys.readouterr().err
