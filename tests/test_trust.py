"""Nothing a model folder carries switches on remote code (issue 16, item 2); skipped steps log
grad_norm as NaN and the torchrun rendezvous listens on ADDR only (item 6)."""
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest

from mllm.cli import main
from test_chat_export import image_path, save_checkpoint, tiny_cfg  # noqa: F401
from test_lmms_eval import lmms_eval  # noqa: F401
from test_reliability import REPO, nan_config, synthetic, train  # noqa: F401

# Imported by transformers only with trust_remote_code: leaves a marker file, then is the
# stock Llama, so a trusted load goes on to answer.
EVIL = '''import pathlib
from transformers import LlamaConfig, LlamaForCausalLM

pathlib.Path({marker!r}).touch()


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tokenizer_dir):  # noqa: F811
    from mllm.inference.export import export_pretrained

    root = tmp_path_factory.mktemp('trust')
    cfg = tiny_cfg(tokenizer_dir)
    export_pretrained(cfg, str(root / 'export'), checkpoint=save_checkpoint(cfg, root / 'i.pth'))
    return str(root / 'export')


@pytest.fixture(scope='module', autouse=True)
def modules_cache(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE: a temporary one here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr('transformers.dynamic_module_utils.HF_MODULES_CACHE',
                      str(tmp_path_factory.mktemp('hf_modules')))
        yield


def planted(exported, tmp_path, **settings):
    """A copy of ``exported`` whose LLM maps to its own Python file (``auto_map``), with
    ``settings`` ({dotted key in mllm_config.json: value}) written into mllm_config.json.
    Returns (folder, marker): the marker appears when that file is imported."""
    folder, marker = str(tmp_path / 'folder'), tmp_path / 'ran'
    shutil.copytree(exported, folder)
    (tmp_path / 'folder' / 'llm' / 'evil.py').write_text(EVIL.format(marker=str(marker)))
    config_path = os.path.join(folder, 'llm', 'config.json')
    with open(config_path) as f:
        config = json.load(f)
    # a downloaded config.json asking for remote code itself
    config.update(trust_remote_code=True, auto_map={'AutoConfig': 'evil.EvilConfig',
                                                    'AutoModelForCausalLM': 'evil.EvilModel'})
    with open(config_path, 'w') as f:
        json.dump(config, f)
    meta_path = os.path.join(folder, 'mllm_config.json')
    with open(meta_path) as f:
        meta = json.load(f)
    for key, value in settings.items():
        *parents, last = key.split('.')
        node = meta
        for part in parents:
            node = node[part]
        node[last] = value
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    return folder, marker


def chat(folder, image, *extra):
    return main(['chat', folder, '--image', image, '--prompt', 'What colour is the shape?',
                 '--max-new-tokens', '2', *extra])


# ---------------------------------------------------------------- item 2: remote code

@pytest.mark.parametrize('key', ['model.llm.trust_remote_code', 'tokenizer.trust_remote_code',
                                 'model.vision_encoder.trust_remote_code',
                                 'image_processor.trust_remote_code'])
def test_an_exported_folder_cannot_switch_on_remote_code(key, exported, image_path,  # noqa: F811
                                                         tmp_path, capsys):
    folder, marker = planted(exported, tmp_path, **{key: True})
    assert chat(folder, image_path) == 1
    err = capsys.readouterr().err
    assert (f'{folder}/mllm_config.json sets {key}=true: an exported folder may not switch on '
            'trust_remote_code') in err
    assert 'pass --trust-remote-code' in err
    assert not marker.exists()
    if key == 'model.llm.trust_remote_code':  # the user's flag does run the folder's code
        assert chat(folder, image_path, '--trust-remote-code') == 0
        assert capsys.readouterr().out.startswith('ASSISTANT: ')
        assert marker.exists()


def test_a_downloaded_config_json_cannot_switch_on_remote_code(exported, image_path,  # noqa: F811
                                                               tmp_path, capsys):
    """llm/config.json sets trust_remote_code and an auto_map: transformers is asked with
    trust_remote_code=False, so it builds its own Llama and the folder's file never runs."""
    folder, marker = planted(exported, tmp_path)
    assert chat(folder, image_path) == 0
    assert not marker.exists()
    assert chat(folder, image_path, '--trust-remote-code') == 0
    assert marker.exists()


def test_export_never_writes_trust_remote_code(tokenizer_dir, tmp_path):  # noqa: F811
    """A training config that turns remote code on (the user's own choice) exports a folder
    that does not: whoever loads it decides."""
    from mllm.engine.config import load_config
    from mllm.inference.export import export_pretrained, load_pretrained

    cfg = load_config('configs/tiny/tiny_llava_synthetic.py', {
        'tokenizer.pretrained': tokenizer_dir, 'llm.trust_remote_code': True,
        'tokenizer.trust_remote_code': True})
    assert cfg.model.llm.trust_remote_code is True
    out = str(tmp_path / 'out')
    export_pretrained(cfg, out, checkpoint=save_checkpoint(cfg, tmp_path / 'i.pth'))
    with open(os.path.join(out, 'mllm_config.json')) as f:
        assert 'trust_remote_code' not in f.read()
    load_pretrained(out)  # a plain Llama: loads without the flag


def test_lmms_eval_adapter_needs_the_model_arg(lmms_eval, exported, tmp_path):  # noqa: F811
    folder, marker = planted(exported, tmp_path, **{'model.llm.trust_remote_code': True})
    create = lmms_eval.adapter.MLLMLmms.create_from_arg_string
    with pytest.raises(ValueError, match='may not switch on trust_remote_code'):
        create(f'pretrained={folder}', dict(device='cpu'))
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_remote_code must be True or False, got 'yes'"):
        create(f'pretrained={folder},trust_remote_code=yes', dict(device='cpu'))
    create(f'pretrained={folder},trust_remote_code=True', dict(device='cpu'))
    assert marker.exists()


# ---------------------------------------------------------------- item 6: skipped steps

def test_a_skipped_step_logs_grad_norm_as_nan(tmp_path, synthetic):  # noqa: F811
    config, env = nan_config(tmp_path, nan_steps=[2])
    result = train(tmp_path / 'w', synthetic, iters=3, config=config, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'non-finite loss nan: optimizer step skipped' in result.stdout + result.stderr
    [path] = glob.glob(str(tmp_path / 'w' / '*' / 'vis_data' / 'scalars.json'))
    with open(path) as f:
        norms = {row['step']: row['grad_norm'] for row in map(json.loads, f) if 'grad_norm' in row}
    assert sorted(norms) == [1, 2, 3]
    assert math.isnan(norms[2]) and math.isfinite(norms[1]) and math.isfinite(norms[3])


# ---------------------------------------------------------------- item 6: rendezvous address

WORKER = '''import os, time
import torch.distributed as dist
dist.init_process_group('gloo')
dist.barrier()
open(f'ready{dist.get_rank()}', 'w').close()
while not os.path.exists('stop'):
    time.sleep(0.1)
'''


def free_port() -> int:
    with socket.create_server(('127.0.0.1', 0)) as sock:
        return sock.getsockname()[1]


def test_the_rendezvous_store_listens_on_the_configured_address_only(tmp_path):
    """torch's own store listens on every interface (``::``) whatever --master_addr says."""
    (tmp_path / 'worker.py').write_text(WORKER)
    port = free_port()
    agent = subprocess.Popen(
        [sys.executable, '-m', 'mllm.engine.torchrun', '--nproc_per_node=2', '--nnodes=1',
         '--node_rank=0', '--master_addr=127.0.0.1', f'--master_port={port}', 'worker.py'],
        cwd=tmp_path, env={**os.environ, 'PYTHONPATH': REPO}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f'ready{r}').exists() for r in (0, 1)):
            assert agent.poll() is None and time.time() < deadline, agent.communicate()[0]
            time.sleep(0.2)
        listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process(agent.pid).net_connections(
            'tcp') if c.status == psutil.CONN_LISTEN]
        assert listening == [('127.0.0.1', port)]
    finally:
        (tmp_path / 'stop').touch()
        output = agent.communicate(timeout=60)[0]
    assert agent.returncode == 0, output


def test_a_busy_rendezvous_port_is_named():
    from mllm.engine.torchrun import bound_store
    with socket.create_server(('127.0.0.1', 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f'cannot listen on 127.0.0.1:{port} for the torchrun '
                           'rendezvous .*set PORT to a free port'):
            bound_store('127.0.0.1', port)
