"""Benchmarks behind ``mllm bench``: mllm's training path against stock XTuner 0.2.0's.

``bench train`` trains the same tiny LLaVA (same HF weights on disk, same projector init,
same samples in the same global batches, same optimiser) twice in one process, with
mllm's ``LLaVAModel`` + ``LLaVADataset`` (offline token cache) + ``flat_llava_collate``
(padding-free batches) and with XTuner's
``LLaVAModel`` + ``LLaVADataset`` + ``default_collate_fn``, steps interleaved so machine
noise hits both alike, and reports real (non-pad) tokens per second for each.

The data is a benchmark-only variant of the synthetic set with LLaVA-665K-like lengths:
mostly short VQA answers, some conversations, some long descriptions and ~6 % text-only
samples (ShareGPT's share of the 665K mix).
"""
import json
import os
import os.path as osp
import random
import statistics
import time
from typing import Dict, List, Optional

import torch

from mllm.datasets.templates import IMAGE_TOKEN_INDEX
from mllm.engine import compat

compat.apply_all()  # before XTuner (imported below, per function): see mllm.engine.compat

# Tiny architecture = configs/_base_/{llms/tiny_llama,vision/tiny_clip}.py
TINY_LLM = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=352, vocab_size=256,
                rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False)
TINY_VIT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, image_size=64, patch_size=8)

# Caption words for the long answers (the word-level tokenizer allows < 256 tokens).
_WORDS = ('the a an of in on with and is are there this image shows picture scene near next to '
          'behind above below left right top bottom side corner middle background foreground '
          'small large big tiny bright dark light red green blue yellow purple orange grey '
          'white black circle square triangle cross shape shapes object objects box frame '
          'pattern stripes rows columns checks plain one two three four several many some '
          'it has have can be seen appears looks like placed drawn filled outlined around '
          'edge centre center close far from each other together single pair group table '
          'sky wall floor person dog cat car tree house window door road water because so '
          'but also very quite slightly mostly partly clearly visible hidden detailed '
          'describe what where how many which colour color answer question using word '
          'phrase please briefly explain').split()
_SHORT_PROMPT = 'Answer the question using a single word or phrase.'
_QUESTIONS = ('What colour is the shape?', 'Where is the shape?', 'How many shapes are there?',
              'What shape is shown?', 'Describe this image in detail.',
              'What is in the picture?', 'Explain the scene.')


def _sentence(rng: random.Random, n: int) -> str:
    return ' '.join(rng.choice(_WORDS) for _ in range(n)) + '.'


def _bench_sample(rng: random.Random, i: int) -> dict:
    """One sample; the mix of kinds and lengths mimics LLaVA-665K (see module docstring)."""
    kind = rng.choices(('vqa', 'conversation', 'detail', 'text'), (0.55, 0.25, 0.14, 0.06))[0]
    if kind == 'vqa':  # VQAv2/GQA style: one short answer
        q, a = f'{rng.choice(_QUESTIONS)} {_SHORT_PROMPT}', _sentence(rng, rng.randint(1, 3))
    elif kind == 'conversation':  # LLaVA-Instruct conversation answers
        q, a = rng.choice(_QUESTIONS), _sentence(rng, rng.randint(8, 60))
    elif kind == 'detail':  # detailed descriptions
        q, a = 'Describe this image in detail.', _sentence(rng, rng.randint(60, 180))
    else:  # ShareGPT text-only
        q, a = _sentence(rng, rng.randint(5, 40)), _sentence(rng, rng.randint(20, 200))
    sample = dict(id=f'bench_{i:06d}', conversations=[
        {'from': 'human', 'value': q if kind == 'text' else f'<image>\n{q}'},
        {'from': 'gpt', 'value': a}])
    if kind != 'text':
        sample['image'] = f'train/{i:06d}.png'
    return sample


def write_bench_data(root: str, num_samples: int = 512, seed: int = 0) -> Dict[str, str]:
    """Images of the synthetic set plus varied-length single-turn conversations.

    Single-turn only: XTuner puts a BOS before every turn, mllm (like LLaVA) only before
    the first, and the benchmark asserts both paths train on identical token ids.

    Returns:
        dict(data_path=, image_folder=, tokenizer=).
    """
    from mllm.datasets.synthetic import build_tokenizer, generate_synthetic_vqa

    paths = generate_synthetic_vqa(osp.join(root, 'synthetic'), num_train=num_samples,
                                   num_val=0, image_size=256, seed=seed)
    rng = random.Random(f'mllm-bench-{seed}')
    samples = [_bench_sample(rng, i) for i in range(num_samples)]
    data_path = osp.join(root, 'bench.json')
    with open(data_path, 'w') as f:
        json.dump(samples, f)
    tokenizer_dir = osp.join(root, 'tokenizer')
    build_tokenizer(list(_WORDS) + list(_QUESTIONS) + [_SHORT_PROMPT]).save_pretrained(
        tokenizer_dir)
    return dict(data_path=data_path, image_folder=paths['image_folder'],
                tokenizer=tokenizer_dir)


def save_tiny_checkpoints(root: str, llm_layers: int = 2, image_size: int = 64,
                          seed: int = 0, llm_config: Optional[dict] = None) -> Dict[str, str]:
    """Random tiny Llama and CLIP ViT written with ``save_pretrained``: both paths load
    exactly these weights. ``llm_config`` overrides ``TINY_LLM`` fields (a preset's
    proportions)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    llm_dir, vision_dir = osp.join(root, 'llm'), osp.join(root, 'vision')
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = dict(TINY_LLM, **(llm_config or {}))
        config['num_hidden_layers'] = llm_layers
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(llm_dir)
        CLIPVisionModel(CLIPVisionConfig(**dict(TINY_VIT, image_size=image_size))
                        ).save_pretrained(vision_dir)
    return dict(llm=llm_dir, vision=vision_dir)


# --------------------------------------------------------------------------- both paths
def _xtuner_map_fn(example):
    """XTuner's ``llava_map_fn`` plus the vicuna_v1 system prompt, which XTuner's stock
    LLaVA configs leave out and LLaVA-1.5 (and mllm) use: both paths then tokenise to
    identical ids, so they do identical work."""
    from xtuner.dataset.map_fns import llava_map_fn
    out = llava_map_fn(example)
    out['conversation'][0]['system'] = ' '  # PROMPT_TEMPLATE.vicuna.SYSTEM holds the text
    return out


def build_mllm_path(paths: Dict[str, str], ckpt: Dict[str, str], image_size: int,
                    patch_size: int, attn: str = 'sdpa', token_cache: Optional[str] = None,
                    answer_only_last_layer: bool = True, gradient_checkpointing=False):
    """mllm's LLaVAModel (projector + LLM train, vision frozen: the finetune recipe) and
    LLaVADataset, reading its offline tokenisation cache under ``token_cache`` (built
    first), as XTuner's path reads its offline folder."""
    import mllm.models  # noqa: F401  (registers the model parts)
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.datasets.llava import LLaVADataset
    from mllm.registry import MODELS

    model = MODELS.build(dict(
        type='LLaVAModel', trainable=['projector', 'llm'],
        answer_only_last_layer=answer_only_last_layer,
        gradient_checkpointing=gradient_checkpointing,
        llm=dict(type='HFCausalLM', pretrained=ckpt['llm'], attn_implementation=attn),
        vision_encoder=dict(type='CLIPVisionEncoder', pretrained=ckpt['vision'],
                            select_layer=-2)))
    dataset = LLaVADataset(paths['data_path'], tokenizer=dict(pretrained=paths['tokenizer']),
                           template='vicuna_v1', image_folder=paths['image_folder'],
                           image_processor=LLaVAImageProcessor(size=image_size,
                                                               token_stride=patch_size),
                           max_length=4096, token_cache=token_cache)
    return model, dataset


def build_xtuner_path(paths: Dict[str, str], ckpt: Dict[str, str], image_size: int,
                      work_dir: str, attn: str = 'sdpa', checkpointing: bool = False):
    """Stock XTuner 0.2.0: ``LLaVAModel`` with the stock finetune settings (vision frozen,
    LLM trains, projector depth 2, layer -2) built from the same checkpoints, and
    ``LLaVADataset`` with the vicuna template, pad-to-square and CLIP's image processor.

    Text is tokenised with XTuner's own ``process_hf_dataset`` (one process, not its
    default 32) and loaded through ``offline_processed_text_folder``, XTuner's documented
    offline path. Towers are passed as built modules, which skips the dtype probing that
    calls the missing ``torch.cpu.is_bf16_supported`` (REFERENCE.md §3).
    ``checkpointing`` is XTuner's ``use_activation_checkpointing`` (on in its LLaVA
    configs: the LLM, the frozen vision tower and the projector recompute).
    """
    from datasets import DatasetDict
    from datasets import Dataset as HFDataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor,
                              CLIPVisionModel)
    from xtuner.dataset import LLaVADataset
    from xtuner.dataset.huggingface import process_hf_dataset
    from xtuner.dataset.map_fns import template_map_fn_factory
    from xtuner.model import LLaVAModel
    from xtuner.utils import PROMPT_TEMPLATE

    llm = AutoModelForCausalLM.from_pretrained(ckpt['llm'], attn_implementation=attn,
                                               torch_dtype=torch.float32)
    model = LLaVAModel(llm=llm, visual_encoder=CLIPVisionModel.from_pretrained(ckpt['vision']),
                       freeze_llm=False, freeze_visual_encoder=True, visual_select_layer=-2,
                       projector_depth=2, use_activation_checkpointing=checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(paths['tokenizer'])
    text_dir = osp.join(work_dir, 'xtuner_text')
    with open(paths['data_path']) as f:
        raw = json.load(f)
    for sample in raw:  # HF datasets needs one schema: text-only samples get image=None
        sample.setdefault('image', None)
    process_hf_dataset(
        dataset=DatasetDict({'train': HFDataset.from_list(raw)}), tokenizer=tokenizer,
        max_length=4096, dataset_map_fn=_xtuner_map_fn,
        template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.vicuna),
        split='train', remove_unused_columns=False, pack_to_max_length=False,
        with_image_token=True, map_num_proc=1).save_to_disk(text_dir)
    processor = CLIPImageProcessor(size={'shortest_edge': image_size},
                                   crop_size={'height': image_size, 'width': image_size})
    dataset = LLaVADataset(image_folder=paths['image_folder'], image_processor=processor,
                           offline_processed_text_folder=text_dir, pad_image_to_square=True)
    return model, dataset


def copy_projector(mllm_model, xtuner_model) -> None:
    """XTuner's projector (``model.0`` / ``model.2``) gets mllm's (``linear_1`` / ``linear_2``)
    weights, so both models start identical."""
    src = mllm_model.projector
    state = {'model.0.weight': src.linear_1.weight, 'model.0.bias': src.linear_1.bias,
             'model.2.weight': src.linear_2.weight, 'model.2.bias': src.linear_2.bias}
    xtuner_model.projector.load_state_dict({k: v.detach().clone() for k, v in state.items()})


def collapse_image_runs(ids: List[int], labels: Optional[List[int]] = None):
    """mllm's ids with each run of image sentinels reduced to one (XTuner's layout); with
    ``labels``, (ids, labels) reduced alike."""
    keep = [k for k, t in enumerate(ids)
            if t != IMAGE_TOKEN_INDEX or k == 0 or ids[k - 1] != IMAGE_TOKEN_INDEX]
    if labels is None:
        return [ids[k] for k in keep]
    return [ids[k] for k in keep], [labels[k] for k in keep]


def check_same_tokens(mllm_dataset, xtuner_dataset, indices) -> None:
    """Both paths must train on identical token ids and labels for every sample."""
    for i in indices:
        ours = mllm_dataset.encode(i)
        theirs = xtuner_dataset.text_data[i]
        ids, labels = collapse_image_runs(ours['input_ids'].tolist(), ours['labels'].tolist())
        if ids != theirs['input_ids'] or labels != theirs['labels']:
            raise AssertionError(f'sample {i} ({theirs.get("id")}): mllm and XTuner token ids '
                                 f'or labels differ:\n{ids}\n{theirs["input_ids"]}')


def grouped_batches(xtuner_dataset, batch_size: int, steps: int, seed: int,
                    sampler: str = 'grouped') -> List[List[int]]:
    """Global batches of XTuner's stock samplers; both paths get these. 'grouped': the
    finetune configs' ``LengthGroupedSampler`` on ``modality_length`` with
    ``per_device_batch_size`` = batch size; 'random': the pretrain configs'
    ``DefaultSampler(shuffle=True)``, i.e. a seeded permutation."""
    from xtuner.dataset.samplers import LengthGroupedSampler

    if sampler == 'grouped':
        order = list(LengthGroupedSampler(xtuner_dataset, per_device_batch_size=batch_size,
                                          length_property='modality_length', seed=seed))
    elif sampler == 'random':
        order = torch.randperm(len(xtuner_dataset),
                               generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        raise ValueError(f"sampler must be 'grouped' or 'random', got {sampler!r}")
    if len(order) < batch_size * steps:
        raise ValueError(f'{steps} steps of {batch_size} need {batch_size * steps} samples, '
                         f'the benchmark set has {len(order)}')
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(steps)]


class _Path:
    """One training path: loader over fixed batches, model, AdamW; ``step()`` times one
    iteration (data loading + forward + backward + optimiser) and returns its loss."""

    def __init__(self, name, model, dataset, collate, batches, lr):
        from torch.utils.data import DataLoader
        # training mode throughout, as both runners set it: from_pretrained leaves the LLM in
        # eval mode, where HF's layers skip gradient checkpointing (no recompute on any path)
        self.name, self.model = name, model.train()
        self.loader = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                      num_workers=0))
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.seconds, self.data_seconds, self.losses, self.seen = [], [], [], []
        self.checkpointed = []  # per step, with per-batch recompute

    def step(self):
        start = time.perf_counter()
        batch = next(self.loader)
        self.data_seconds.append(time.perf_counter() - start)
        self.seen.append(batch.pop('sample_ids'))
        loss = self.forward(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def forward(self, batch):
        raise NotImplementedError


class _MllmPath(_Path):
    def forward(self, batch):
        loss = self.model(**batch, mode='loss')['loss']
        if self.model.per_batch_checkpointing:
            self.checkpointed.append(self.model.checkpointed_layers)
        return loss


class _XtunerPath(_Path):
    def forward(self, batch):
        return self.model(batch['data'], mode='loss')['loss']


def _mllm_collate(instances):
    from mllm.datasets.collate import flat_llava_collate
    batch = flat_llava_collate(instances)
    batch['sample_ids'] = sorted(i for row in batch.pop('sample_rows') for i in row)
    return batch


def _xtuner_collate(instances):
    from xtuner.dataset.collate_fns import default_collate_fn
    batch = default_collate_fn(instances)
    batch['sample_ids'] = sorted(int(x['id'].split('_')[-1]) for x in instances)
    return batch


# A preset fixes the LLM's proportions, the data size and the run length of `bench train`.
# '7b-like': LLaVA-1.5-7B's proportions (vocabulary 32,000; the LM head 4.7 % of the LLM's
# FLOPs, vicuna-7B's is 1.9 %) at 32 layers of width 1664 (1.1 B parameters: a GPU run, hours
# on a CPU). 'cpu': the same head share and depth >= 8 on a CPU budget, which forces a
# smaller vocabulary (1280): vocabulary 32,000 with a 5 % head needs layers x width >= 50,000.
# Both: 4096 samples, XTuner with its configs' checkpointing against mllm's planned policy.
BENCH_PRESETS = {
    'tiny': dict(llm_config={}, llm_layers=2, num_samples=512, steps=30, checkpointing=False),
    '7b-like': dict(llm_config=dict(vocab_size=32000, hidden_size=1664, num_attention_heads=13,
                                    num_key_value_heads=13, intermediate_size=4480),
                    llm_layers=32, num_samples=4096, steps=6, checkpointing=True),
    'cpu': dict(llm_config=dict(vocab_size=1280, hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=4, intermediate_size=688),
                llm_layers=8, num_samples=4096, steps=12, checkpointing=True),
}
# mllm variants of the ablation: each turns one of mllm's terms back to what XTuner does
ABLATION = ('padded', 'full_head', 'full_last_layer', 'full_recompute')


def head_flops_share(llm_config: dict) -> float:
    """The LM head's share of a Llama LLM's forward FLOPs per token (attention scores left
    out): h·V / (layers·(4h² + 3h·i) + h·V), for GQA-free configs."""
    c = dict(TINY_LLM, **llm_config)
    h, i = c['hidden_size'], c['intermediate_size']
    head = h * c['vocab_size']
    return head / (c['num_hidden_layers'] * (4 * h * h + 3 * h * i) + head)


def seven_b_activation_room(gpus: int = 8, gpu_mem_gb: float = 80.0, stage: str = 'zero2') -> float:
    """The memory budget the benchmark gives mllm's planner, from LLaVA-1.5-7B finetuning
    (16 x 2048 tokens per GPU, padding-free, answer-only head) at ``gpus`` x ``gpu_mem_gb``
    under ``stage``: the room left for activations as a share of all layers' activations.
    With the first K of L layers checkpointed the activations are (b (L - K) + 2 h K) T,
    b a block's bytes per token, so the same share gives about the same K / L at any depth."""
    from mllm.bench.memory import plan_memory
    from mllm.engine.config import load_config
    report = plan_memory(load_config('llava15_vicuna7b_finetune'), gpus=gpus,
                         gpu_mem_gb=gpu_mem_gb)
    row = report['stages'][stage]
    fixed = sum(row[k] for k in ('weights', 'gradients', 'optimizer', 'working_set',
                                 'logits_gb', 'overhead_gb'))
    return (gpu_mem_gb - fixed) / (row['memory_gb_without_checkpointing'] - fixed)


def planned_checkpointing(llm_config: dict, batches: List[List[int]], lengths: List[int],
                          learned: List[int], room: float) -> dict:
    """mllm's policy for the benchmark's model: the fewest checkpointed layers whose
    activations over the worst batch fit ``room`` x the un-checkpointed activations
    (``mllm.bench.memory.plan_policy``, fp32)."""
    from mllm.bench.memory import (Batch, Transformer, activation_gb, llm_bytes_per_token,
                                   plan_policy)
    c = dict(TINY_LLM, **llm_config)
    h = c['hidden_size']
    llm = Transformer(layers=c['num_hidden_layers'], hidden=h, heads=c['num_attention_heads'],
                      flash=True, params_per_layer=4 * h * h + 3 * h * c['intermediate_size'],
                      intermediate=c['intermediate_size'])
    worst = max(batches, key=lambda b: sum(lengths[i] for i in b))
    batch = Batch(len(worst), sum(lengths[i] for i in worst), max(lengths[i] for i in worst),
                  sum(learned[i] for i in worst), len(worst), 'benchmark batches')
    none = activation_gb(llm, 0, batch, 0, precision='fp32')['activations_gb']
    policy = plan_policy(room * none, llm, 0, batch, True, precision='fp32')
    # as `mllm train` resolves 'auto': each batch its own layers within the worst one's room
    per_batch = dict(room_gb=room * none, **llm_bytes_per_token(llm, precision='fp32'))
    return dict(policy, per_batch=per_batch, budget_mb=room * none * 1e3,
                activations_without_checkpointing_mb=none * 1e3,
                worst_batch_tokens=batch.tokens, layers=llm.layers)


def _mllm_padded_collate(instances):
    from mllm.datasets.collate import llava_collate
    batch = llava_collate(instances)
    batch['sample_ids'] = sorted(x['index'] for x in instances)
    return batch


def bench_train(work_dir: str, steps: int = 30, batch_size: int = 16, warmup: Optional[int] = None,
                num_samples: int = 512, seed: int = 0, lr: float = 2e-5,
                llm_layers: int = 2, sampler: str = 'grouped',
                answer_only_last_layer: bool = True, llm_config: Optional[dict] = None,
                checkpointing: bool = False, memory_room: Optional[float] = None,
                ablation: bool = False) -> dict:
    """Train mllm's and XTuner's path side by side; tokens/s of both and their ratio.

    Args:
        work_dir: where the data, checkpoints and XTuner's tokenised text are written.
        steps: optimiser steps per path, ``warmup`` of them untimed. Defaults to 30.
        batch_size: samples per global batch (XTuner's per-device 16). Defaults to 16.
        warmup: first steps left out of the timing. Defaults to min(3, steps // 2).
        num_samples: size of the generated set. Defaults to 512.
        seed: data, weights and sampler seed. Defaults to 0.
        lr: AdamW learning rate (LLaVA-1.5 finetune's 2e-5). Defaults to 2e-5.
        llm_layers: decoder layers of the tiny LLM. Defaults to 2.
        sampler: 'grouped' (XTuner's finetune sampler) or 'random' (its pretrain
            sampler); see ``grouped_batches``. Defaults to 'grouped'.
        answer_only_last_layer: mllm's model option (``LLaVAModel``); False runs HF's
            full last decoder layer. Defaults to True.
        llm_config: ``TINY_LLM`` fields to override (``BENCH_PRESETS``). Defaults to None.
        checkpointing: XTuner as its configs train (activation checkpointing on) against
            mllm with the planned policy for a memory budget of ``memory_room`` x its
            un-checkpointed activations. Defaults to False (neither checkpoints).
        memory_room: defaults to ``seven_b_activation_room()``, the share LLaVA-1.5-7B
            finetuning has room for on 8 x 80 GB under ZeRO-2.
        ablation: also time mllm with one term at a time turned back to XTuner's way
            (``ABLATION``): each term's share of mllm's gain. Defaults to False.

    Returns:
        dict with ``mllm_tokens_per_s``, ``xtuner_tokens_per_s``, ``ratio`` and the
        losses, token and padding counts behind them (plus ``ablation`` and the policy).
    """
    warmup = min(3, steps // 2) if warmup is None else warmup
    from mllm.datasets.collate import flat_llava_collate
    if steps <= warmup:
        raise ValueError(f'steps ({steps}) must exceed warmup ({warmup})')
    llm_config = dict(llm_config or {}, num_hidden_layers=llm_layers)
    paths = write_bench_data(osp.join(work_dir, 'data'), num_samples, seed)
    ckpt = save_tiny_checkpoints(osp.join(work_dir, 'ckpt'), llm_layers=llm_layers, seed=seed,
                                 llm_config=llm_config)
    cache = osp.join(work_dir, 'mllm_token_cache')
    theirs, their_data = build_xtuner_path(paths, ckpt, TINY_VIT['image_size'], work_dir,
                                           checkpointing=checkpointing)
    # the batches first: the planned policy needs the worst one
    batches = grouped_batches(their_data, batch_size, steps, seed, sampler)
    torch.manual_seed(seed)
    ours, our_data = build_mllm_path(paths, ckpt, TINY_VIT['image_size'], TINY_VIT['patch_size'],
                                     token_cache=cache,
                                     answer_only_last_layer=answer_only_last_layer)
    lengths, learned = [], []
    for i in range(len(our_data)):
        encoded = our_data.encode(i)
        lengths.append(len(encoded['input_ids']))
        learned.append(int((encoded['labels'][1:] != -100).sum()))
    policy = None
    if checkpointing:
        room = seven_b_activation_room() if memory_room is None else memory_room
        policy = planned_checkpointing(llm_config, batches, lengths, learned, room)
        policy['memory_room'] = room
        _plan_recompute(ours, policy)
    copy_projector(ours, theirs)
    check_same_tokens(our_data, their_data, sorted({i for b in batches for i in b}))
    runs = [_MllmPath('mllm', ours, our_data, _mllm_collate, batches, lr),
            _XtunerPath('xtuner', theirs, their_data, _xtuner_collate, batches, lr)]
    if ablation:
        runs += _ablation_runs(paths, ckpt, cache, ours, batches, lr, policy,
                               answer_only_last_layer)
    for k in range(steps):
        order = runs[k % len(runs):] + runs[:k % len(runs)]  # rotate who goes first
        for run in order:
            run.step()
    for k, batch in enumerate(batches):
        if not all(r.seen[k] == sorted(batch) for r in runs):
            raise AssertionError(f'step {k}: the paths saw different samples')
    tokens = [sum(lengths[i] for i in b) for b in batches]
    packed = [flat_llava_collate([dict(input_ids=[0] * lengths[i]) for i in b])['input_ids']
              for b in batches[warmup:]]
    timed = sum(tokens[warmup:])
    result = {f'{r.name}_tokens_per_s': timed / sum(r.seconds[warmup:]) for r in runs[:2]}
    result['ratio'] = result['mllm_tokens_per_s'] / result['xtuner_tokens_per_s']
    # per batch, both paths ran back to back: the median of those ratios shrugs off bursts
    # of load from other processes better than the ratio of sums
    result['median_step_ratio'] = statistics.median(
        x / m for m, x in zip(runs[0].seconds[warmup:], runs[1].seconds[warmup:]))
    result.update(
        steps=steps, warmup=warmup, batch_size=batch_size, llm_layers=llm_layers,
        vocab_size=llm_config.get('vocab_size', TINY_LLM['vocab_size']),
        hidden_size=llm_config.get('hidden_size', TINY_LLM['hidden_size']),
        head_flops_share=head_flops_share(llm_config), num_samples=num_samples,
        sampler=sampler, answer_only_last_layer=answer_only_last_layer,
        tokens_timed=timed,
        padded_tokens_xtuner=sum(max(lengths[i] for i in b) * len(b) for b in batches[warmup:]),
        padded_tokens_mllm=sum(rows.numel() for rows in packed),
        learned_tokens_timed=sum(learned[i] for b in batches[warmup:] for i in b),
        mllm_losses=runs[0].losses, xtuner_losses=runs[1].losses,
        max_loss_diff=max(abs(a - b) for a, b in zip(runs[0].losses, runs[1].losses)),
        same_samples=True, torch_threads=torch.get_num_threads(),
        xtuner_checkpointing=checkpointing, checkpoint_policy=policy,
        checkpoint_layers_per_step=runs[0].checkpointed)
    for r in runs[:2]:
        result[f'{r.name}_data_share'] = sum(r.data_seconds[warmup:]) / sum(r.seconds[warmup:])
    if ablation:
        base = sum(runs[0].seconds[warmup:])
        result['ablation'] = {r.name[len('mllm_'):]: dict(
            step_time_vs_mllm=sum(r.seconds[warmup:]) / base,
            max_loss_diff_vs_mllm=max(abs(a - b) for a, b in zip(r.losses, runs[0].losses)))
            for r in runs[2:]}
    result['projection_7b'] = project_terms_7b(result, policy)
    return result


def _plan_recompute(model, policy: dict) -> None:
    """The worst batch's layers, re-chosen per batch from its tokens (``per_batch``)."""
    from mllm.models.llms import enable_gradient_checkpointing
    enable_gradient_checkpointing(model.llm, policy['checkpoint_layers'])
    model.per_batch_checkpointing = policy['per_batch']


def _ablation_runs(paths, ckpt, cache, ours, batches, lr, policy, answer_only_last_layer):
    """mllm with one term at a time back to XTuner's way; same weights, batches, seed."""
    runs = []
    for term in ABLATION:
        torch.manual_seed(0)
        model, data = build_mllm_path(
            paths, ckpt, TINY_VIT['image_size'], TINY_VIT['patch_size'], token_cache=cache,
            answer_only_last_layer=answer_only_last_layer and term != 'full_last_layer')
        model.projector.load_state_dict(ours.projector.state_dict())
        layers = model.llm.config.num_hidden_layers
        if term == 'full_recompute':
            from mllm.models.llms import enable_gradient_checkpointing
            enable_gradient_checkpointing(model.llm, layers)
        elif policy:
            _plan_recompute(model, policy)
        if term == 'full_head':  # HF's forward: logits at every position, then the loss
            model._decoder_and_head = lambda: None
        collate = _mllm_padded_collate if term == 'padded' else _mllm_collate
        runs.append(_MllmPath(f'mllm_{term}', model, data, collate, batches, lr))
    return runs


def project_terms_7b(result: dict, policy: Optional[dict]) -> dict:
    """FLOP estimate of each term at LLaVA-1.5-7B shapes (vicuna-7B: 32 layers, width 4096,
    MLP 11008, vocabulary 32,000; the frozen ViT-L/336 forward per image), with the
    benchmark's measured padding and answer share: the step-time share each term removes,
    and XTuner's step over mllm's.

    XTuner: padded batches, logits and the last layer's MLP at every position, every layer
    recomputed (1/3 of a step that trains the LLM). mllm: real tokens only, head and last
    MLP at answer positions, recompute of the share of the layers the benchmark's policy
    checkpointed (per step, when each batch chose its own). The fused elementwise kernels
    are not in this FLOP model.
    """
    h, i, vocab, layers = 4096, 11008, 32000, 32
    layer = 2 * (4 * h * h + 3 * h * i)  # forward FLOPs per token
    tokens = result['tokens_timed']
    padded = result['padded_tokens_xtuner']
    answers = result['learned_tokens_timed']
    mlp = 2 * 3 * h * i
    head = 2 * h * vocab
    # forward FLOPs over the timed tokens
    xtuner_fwd = padded * (layers * layer + head)
    mllm_fwd = tokens * layers * layer - (tokens - answers) * mlp + answers * head
    # the share of layers mllm recomputed: per step when each batch chose its own
    per_step = result.get('checkpoint_layers_per_step')
    share = ((statistics.mean(per_step) if per_step else
              (policy or {}).get('checkpoint_layers', layers))
             / (policy or {}).get('layers', layers))
    xtuner_step = 3 * xtuner_fwd + padded * layers * layer
    mllm_step = 3 * mllm_fwd + share * tokens * layers * layer
    return dict(
        padding_free=(padded - tokens) * (4 * layers * layer + 3 * head) / xtuner_step,
        answer_only_head=(tokens - answers) * head * 3 / xtuner_step,
        last_layer_mlp=(tokens - answers) * mlp * 3 / xtuner_step,
        recompute=(1 - share) * tokens * layers * layer / xtuner_step,
        checkpointed_share=share, xtuner_step_over_mllm=xtuner_step / mllm_step,
        note='FLOP estimate (vision forward and attention scores left out)')


# --------------------------------------------------------------- full-size step, projection
A100_BF16_PEAK = 312e12  # dense bf16 tensor-core FLOP/s, NVIDIA A100 datasheet
# dense bf16 datasheet peaks by device name (SXM unless named): MFU in the usual sense
DATASHEET_BF16_PEAKS = (('A100', 312e12), ('H100 PCIe', 756e12), ('H100', 989e12),
                        ('H200', 989e12))
# Samples per epoch: LLaVA-1.5's LCS-558K (blip_laion_cc_sbu_558k.json, 558,128) and
# llava_v1_5_mix665k.json (665,298), as listed in the LLaVA repository's data docs.
DATASET_SAMPLES = {'pretrain': 558_128, 'finetune': 665_298}
# Text tokens per sample (assumed, not measured here): LCS-558K captions are short BLIP
# captions (~60 with the prompt); the 665K mix averages a few hundred (multi-turn
# conversations next to one-phrase VQA answers).
TEXT_TOKENS = {'pretrain': 60, 'finetune': 300}


def train_flops_per_sample(llm_params: int, llm_layers: int, llm_hidden: int, seq_len: int,
                           vision_forward_flops: float, llm_trainable: bool = True) -> float:
    """Model FLOPs of one sample's forward + backward (recomputation not counted, as MFU
    requires).

    LLM: 2N per token forward, 4N backward when its weights train (input and weight
    gradients), 2N when frozen (input gradients only, to reach the projector); attention
    scores add 2 x 2 x layers x hidden x seq per token forward (QK^T and AV), three times
    that with the backward (PaLM, Chowdhery et al. 2022, appendix B). A frozen vision tower
    runs forward only: ``vision_forward_flops`` per sample.
    """
    per_token = (6 if llm_trainable else 4) * llm_params
    attention = 3 * 4 * llm_layers * llm_hidden * seq_len
    return seq_len * (per_token + attention) + vision_forward_flops


def project_hours(flops_per_sample: float, samples: int, mfu: float, gpus: int = 8,
                  peak: float = A100_BF16_PEAK) -> float:
    """Wall hours for ``samples`` on ``gpus`` GPUs running at ``mfu`` of ``peak``."""
    if not 0 < mfu <= 1:
        raise ValueError(f'mfu must be in (0, 1], got {mfu}')
    return flops_per_sample * samples / (gpus * peak * mfu) / 3600


def _random_batch(model, processor, batch: int, text_tokens: int, device, dtype, vocab: int,
                  boxes_per_image: int = 0):
    """``batch`` samples of one image + ``text_tokens`` random tokens, answers on the
    second half of the text (labels), no padding; MG-LLaVA models also get
    ``boxes_per_image`` random boxes per image (one object token each)."""
    size = (processor.size, processor.size)
    visual = model.num_visual_tokens(size) + boxes_per_image
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, 1 + visual + text_tokens), generator=g)
    ids[:, 1:1 + visual] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :1 + visual + text_tokens // 2] = -100
    pixels = torch.randn(batch, 3, size[1], size[0], generator=g)
    data = dict(input_ids=ids.to(device), labels=labels.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixels.to(device, dtype))
    if boxes_per_image:
        corners = torch.rand(batch, boxes_per_image, 2, 2, generator=g) * size[0]
        data['boxes'] = [torch.cat([c.min(1).values, c.max(1).values], -1).to(device, dtype)
                         for c in corners]  # (n, 4) xyxy per image
    return data, visual


def datasheet_bf16_peak(device_name: str) -> Optional[float]:
    """The datasheet's dense bf16 FLOP/s of a known NVIDIA device, else None."""
    return next((peak for name, peak in DATASHEET_BF16_PEAKS if name in device_name), None)


def bench_step(cfg, stage: str = 'finetune', device: str = 'cuda', steps: int = 3,
               batch: Optional[int] = None, text_tokens: Optional[int] = None,
               gpus: int = 8, boxes_per_image: int = 20) -> dict:
    """Forward + backward of a config's model with random weights on one device: tokens/s,
    TFLOP/s, MFU against the A100 bf16 peak (and on CUDA against the device's measured
    peak and its datasheet's), and the projected 8 x A100 hours for one epoch of the
    stage's data (on CUDA at the device's own MFU against its datasheet, else at the A100
    one).

    On CUDA: bf16 weights, SDPA attention and the config's gradient checkpointing. The
    optimiser step is left out (under ZeRO it is sharded over the GPUs and small next to
    forward + backward). On CPU (tiny configs) fp32, for testing the arithmetic. MG-LLaVA
    models get ``boxes_per_image`` object boxes per image (an assumption: the detector's
    count varies per image).
    """
    from torch.utils.flop_counter import FlopCounterMode

    import mllm.models  # noqa: F401
    from mllm.registry import MODELS, TRANSFORMS

    cuda = device.startswith('cuda')
    dtype = torch.bfloat16 if cuda else torch.float32
    model_cfg = cfg.model.copy()
    model_cfg['llm'] = dict(model_cfg['llm'], load_weights=False, pretrained=None,
                            torch_dtype='bfloat16' if cuda else 'float32',
                            attn_implementation='sdpa')
    for key in ('vision_encoder', 'high_res_encoder'):  # MG-LLaVA has a second tower
        if key in model_cfg:
            model_cfg[key] = dict(model_cfg[key], load_weights=False, pretrained=None)
    model_cfg.pop('lora', None)
    if model_cfg.get('gradient_checkpointing') == 'auto':  # the plan for 8 x 80 GB, ZeRO-2
        from mllm.bench.memory import plan_memory
        row = plan_memory(cfg, gpus=gpus)['stages']['zero2']
        model_cfg['gradient_checkpointing'] = dict(llm=row['checkpoint_layers'],
                                                   vision=row['checkpoint_vision'])
        if 'per_batch' in row:  # as `mllm train` resolves it
            model_cfg['gradient_checkpointing']['per_batch'] = row['per_batch']
    torch.manual_seed(0)
    # built on the device: a 7B model's random init on the host took over a minute
    with torch.device(device):
        model = MODELS.build(model_cfg)
    model.to(device, dtype).train()
    processor = TRANSFORMS.build(cfg.image_processor)
    llm_cfg = model.llm.config
    batch = batch or cfg.train_dataloader.batch_size
    text_tokens = text_tokens or TEXT_TOKENS[stage]
    boxes = boxes_per_image if hasattr(model, 'high_res_encoder') else 0
    data, visual = _random_batch(model, processor, batch, text_tokens, device, dtype,
                                 llm_cfg.vocab_size, boxes)
    one = dict(boxes=data['boxes'][:1]) if boxes else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_images(data['pixel_values'][:1], **one)
    vision_flops = counter.get_total_flops()  # one image, forward
    seconds = []
    for k in range(steps + 1):  # the first step warms up (allocator, kernels)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**data, mode='loss')['loss'].backward()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    step = statistics.median(seconds[1:])
    llm_params = sum(p.numel() for p in model.llm.parameters())
    seq = 1 + visual + text_tokens
    llm_trainable = any(p.requires_grad for p in model.llm.parameters())
    flops = train_flops_per_sample(llm_params, llm_cfg.num_hidden_layers, llm_cfg.hidden_size,
                                   seq, vision_flops, llm_trainable)
    achieved = flops * batch / step
    mfu = achieved / A100_BF16_PEAK
    result = dict(device=torch.cuda.get_device_name() if cuda else 'cpu', stage=stage,
                  batch=batch, seq_len=seq, visual_tokens=visual, step_s=step,
                  tokens_per_s=batch * seq / step, tflops=achieved / 1e12,
                  flops_per_sample=flops, mfu_vs_a100=mfu, samples=DATASET_SAMPLES[stage],
                  gradient_checkpointing=model_cfg.get('gradient_checkpointing'),
                  checkpointed_layers=getattr(model, 'checkpointed_layers', None))
    projection_mfu = mfu
    if cuda:
        from mllm.bench.gpu import matmul_peak
        result['peak_memory_gb'] = torch.cuda.max_memory_allocated() / 1e9
        # against this device's own bf16 matmul peak (an H200 reads above 100 % of an A100)
        result['matmul_peak_tflops'] = matmul_peak(device) / 1e12
        result['mfu'] = achieved / (result['matmul_peak_tflops'] * 1e12)
        # an A100 at this device's MFU (against its datasheet, as an A100's is; else its
        # measured peak, which flatters it): the MFU against the A100's datasheet is above
        # 1 on an H200 and says nothing about an A100's step
        datasheet = datasheet_bf16_peak(result['device'])
        result['mfu_vs_datasheet'] = achieved / datasheet if datasheet else None
        projection_mfu = result['mfu_vs_datasheet'] or result['mfu']
    result['projected_hours_8xA100'] = project_hours(flops, DATASET_SAMPLES[stage],
                                                     min(projection_mfu, 1.0), gpus=gpus)
    return result


# --------------------------------------------------------------------------- data pipeline
# A GPU's appetite, from REFERENCE.md: LLaVA-1.5's two stages (558K + 665K samples) take
# ~26 h on 8xA100 (seed 003), i.e. ~1.6 samples/s per GPU on average. The pretrain stage
# (projector only) runs faster than the average; allow 3x for it.
GPU_SAMPLES_PER_S = (558_128 + 665_298) / (26 * 3600 * 8) * 3
# (target side, ViT/ConvNeXt token stride): LLaVA-1.5's 336 ViT and ConvLLaVA's 768-1536
RESOLUTIONS = ((336, 14), (768, 64), (1024, 64), (1536, 64))


def _photo(size, seed: int):
    """A JPEG-like test image: smooth gradients plus noise and shapes (compresses and decodes
    like a photo, unlike a flat synthetic drawing)."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x * 200, y * 180, (1 - x) * 160], -1) + rng.normal(0, 25, (h, w, 3))
    image = Image.fromarray(base.clip(0, 255).astype('uint8'))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        draw.ellipse((x0, y0, x0 + rng.integers(10, w // 3), y0 + rng.integers(10, h // 3)),
                     fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def _rate(fn, items, min_seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` over ``items``, repeated for at least ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        calls += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls / elapsed


def bench_data(work_dir: str, num_images: int = 8, source_size=(640, 480)) -> dict:
    """Images/s of one worker (one process, one thread): JPEG decode + pad to square +
    resize + normalise at each resolution, and UHD slicing of a 672x1008 image; token-
    isation samples/s of mllm's on-the-fly encoding, of reading mllm's offline token cache
    and of reading XTuner's offline pre-tokenised arrow folder; MG-LLaVA's mapping of 20
    boxes per image. Sources are 640x480 JPEGs (COCO's typical size, the bulk of
    LLaVA-665K).
    """
    from PIL import Image

    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.datasets.slicing import UHDImageProcessor

    folder = osp.join(work_dir, 'jpeg')
    os.makedirs(folder, exist_ok=True)
    files = []
    for k in range(num_images):
        files.append(osp.join(folder, f'{k}.jpg'))
        _photo(source_size, k).save(files[-1], quality=90)
    tall = osp.join(folder, 'tall.jpg')
    _photo((672, 1008), 99).save(tall, quality=90)

    def decode(path):
        with Image.open(path) as image:
            return image.convert('RGB')

    result = dict(source_size=list(source_size), images_per_s={},
                  decode_images_per_s=_rate(decode, files))
    for side, stride in RESOLUTIONS:
        processor = LLaVAImageProcessor(size=side, token_stride=stride)
        result['images_per_s'][str(side)] = _rate(lambda p: processor(decode(p)), files)
    uhd = UHDImageProcessor()
    result['uhd_672x1008_images_per_s'] = _rate(lambda p: uhd(decode(p)), [tall])
    # MG-LLaVA: 20 detector boxes per image mapped through pad-to-square + resize to 768
    processor = LLaVAImageProcessor(size=768, token_stride=32)
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(20, 2, 2, generator=g) * torch.tensor(source_size, dtype=torch.float)
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], -1)  # (20, x0 y0 x1 y1)
    result['box_mapping_per_s'] = _rate(lambda b: processor.map_boxes(b, source_size), [boxes])
    result['images_per_s']['768+boxes'] = _rate(
        lambda p: (processor(decode(p)), processor.map_boxes(boxes, source_size)), files)
    result.update(_bench_tokenisation(work_dir))
    slowest = min(result['images_per_s'][str(side)] for side, _ in RESOLUTIONS)
    result['gpu_samples_per_s_assumed'] = GPU_SAMPLES_PER_S
    result['workers_needed_at_1536'] = GPU_SAMPLES_PER_S / slowest
    result['eight_workers_outrun_gpu'] = 8 * slowest > GPU_SAMPLES_PER_S
    return result


def _bench_tokenisation(work_dir: str) -> dict:
    """Samples/s: mllm's template encoding per sample, and reading the ids back from
    XTuner's offline (pre-tokenised) folder, on the benchmark's varied-length set."""
    from datasets import load_from_disk

    from mllm.datasets.llava import LLaVADataset
    from mllm.datasets.templates import encode_conversation

    paths = write_bench_data(osp.join(work_dir, 'data'), 256, 0)
    dataset = LLaVADataset(paths['data_path'], tokenizer=dict(pretrained=paths['tokenizer']),
                           template='vicuna_v1', image_processor=dict(
                               type='LLaVAImageProcessor', size=336), max_length=4096)
    samples = [s['conversations'] for s in dataset.samples]
    online = _rate(lambda c: encode_conversation(c, dataset.tokenizer, dataset.template,
                                                 num_image_tokens=576 if '<image>' in
                                                 c[0]['value'] else 0), samples)
    text_dir = osp.join(work_dir, 'xtuner_text')
    if not osp.isdir(text_dir):
        build_xtuner_path(paths, save_tiny_checkpoints(osp.join(work_dir, 'ckpt')), 64, work_dir)
    offline = load_from_disk(text_dir)
    cached = _rate(lambda i: offline[i]['input_ids'], range(len(offline)))
    # mllm's own offline cache (LLaVADataset(token_cache=...)): built once, then read back
    # with the image sentinel expanded to 576 tokens and max_length applied
    start = time.perf_counter()
    token_cache = LLaVADataset(paths['data_path'], tokenizer=dict(pretrained=paths['tokenizer']),
                               template='vicuna_v1', image_processor=dict(
                                   type='LLaVAImageProcessor', size=336), max_length=4096,
                               token_cache=osp.join(work_dir, 'mllm_token_cache')).token_cache
    build_seconds = time.perf_counter() - start
    images = ['<image>' in c[0]['value'] for c in samples]
    ours = _rate(lambda i: token_cache.get(i, 576 if images[i] else 0, 4096), range(len(images)))
    return dict(tokenise_samples_per_s=online, offline_cache_samples_per_s=cached,
                mllm_token_cache_samples_per_s=ours,
                mllm_token_cache_build_seconds=build_seconds)


# ------------------------------------------------------------------------------- scaling
_TINY_CONVNEXT = dict(type='ConvNeXtEncoder', backend='timm', model_name='convnext_atto',
                      model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
                      extra_stage=dict(channels=256, depth=1))  # stride 64, as ConvLLaVA
SCALE_POINTS = (
    # (row, vision encoder, image side, token stride, LLM layers, batch, text tokens)
    ('336 px, ViT/14 (LLaVA-1.5 layout)',
     dict(type='CLIPVisionEncoder', config=dict(TINY_VIT, image_size=336, patch_size=14)),
     336, 14, 2, 4, 100),
    ('768 px, ConvNeXt/64 (ConvLLaVA)', _TINY_CONVNEXT, 768, 64, 2, 4, 100),
    ('1024 px, ConvNeXt/64 (ConvLLaVA)', _TINY_CONVNEXT, 1024, 64, 2, 4, 100),
    ('1536 px, ConvNeXt/64 (ConvLLaVA)', _TINY_CONVNEXT, 1536, 64, 2, 4, 100),
    ('LLM 2 layers, 64 px ViT/8', dict(type='CLIPVisionEncoder', config=dict(TINY_VIT)),
     64, 8, 2, 16, 100),
    ('LLM 4 layers, 64 px ViT/8', dict(type='CLIPVisionEncoder', config=dict(TINY_VIT)),
     64, 8, 4, 16, 100),
    ('LLM 8 layers, 64 px ViT/8', dict(type='CLIPVisionEncoder', config=dict(TINY_VIT)),
     64, 8, 8, 16, 100),
)


def _rss_kb() -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))


def scale_point(vision: dict, side: int, stride: int, llm_layers: int, batch: int,
                text_tokens: int, steps: int = 3) -> dict:
    """One config's training step (forward, backward, AdamW; everything trains) on random
    data: median step time and peak RSS above the process's RSS before the model was built.
    Run it in a fresh process (``bench_scale`` does) so the peak is this config's own."""
    import resource

    import mllm.models  # noqa: F401
    from mllm.datasets.image_processing import LLaVAImageProcessor
    from mllm.registry import MODELS

    base_kb = _rss_kb()
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='LLaVAModel', trainable=['vision_encoder', 'projector', 'llm'],
        llm=dict(type='HFCausalLM', attn_implementation='sdpa', config=dict(
            TINY_LLM, model_type='llama', num_hidden_layers=llm_layers)),
        vision_encoder=vision))
    processor = LLaVAImageProcessor(size=side, token_stride=stride)
    data, visual = _random_batch(model, processor, batch, text_tokens, 'cpu', torch.float32,
                                 TINY_LLM['vocab_size'])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(**data, mode='loss')['loss'].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(visual_tokens=visual, seq_len=1 + visual + text_tokens, batch=batch,
                step_s=statistics.median(seconds[1:]), peak_rss_mb=peak_kb / 1024,
                peak_above_base_mb=(peak_kb - base_kb) / 1024)


def bench_scale(work_dir: str, steps: int = 3) -> dict:
    """``scale_point`` for each row of ``SCALE_POINTS``, each in its own process."""
    import subprocess
    import sys

    rows = {}
    for name, vision, side, stride, layers, batch, text in SCALE_POINTS:
        spec = json.dumps(dict(vision=vision, side=side, stride=stride, llm_layers=layers,
                               batch=batch, text_tokens=text, steps=steps))
        code = ('import json, sys, torch; torch.set_num_threads(%d); '
                'from mllm.bench.benchmark import scale_point; '
                'print(json.dumps(scale_point(**json.loads(sys.argv[1]))))'
                % torch.get_num_threads())
        out = subprocess.run([sys.executable, '-c', code, spec], capture_output=True,
                             text=True, cwd=work_dir)
        if out.returncode:
            raise RuntimeError(f'scale point {name!r} failed:\n{out.stderr[-2000:]}')
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(rows=rows)


# -------------------------------------------------------------------------------- memory
def bench_memory(work_dir: str, stages=('zero1', 'zero2', 'zero3'), iters: int = 4,
                 batch: int = 16) -> dict:
    """Per ZeRO stage: a 2-process DeepSpeed run (fp32 JSONs, gloo) of the tiny config on
    the synthetic set; each rank's RSS at train start and peak RSS (``PeakMemoryHook``),
    next to ``mllm plan``'s per-GPU estimate (fp32, 2 GPUs, no CUDA overhead, sequence =
    the longest sample). A stage whose run fails is reported with its error, not raised.
    """
    import subprocess
    import sys

    from mllm.datasets.synthetic import generate_synthetic_vqa
    from mllm.engine.config import CONFIG_ROOT, load_config
    from mllm.bench.memory import plan_memory

    data = generate_synthetic_vqa(osp.join(work_dir, 'synthetic'), num_train=128, num_val=0)
    config = osp.join(work_dir, 'tiny_llava_memory.py')
    with open(config, 'w') as f:  # the tiny recipe plus the hook that records memory
        f.write(f"_base_ = ['{CONFIG_ROOT}/tiny/tiny_llava_synthetic.py']\n"
                "custom_hooks = [dict(type='ThroughputHook'), dict(type='PeakMemoryHook')]\n")
    options = [f'train_dataloader.dataset.data_path={data["train"]}',
               f'train_dataloader.dataset.image_folder={data["image_folder"]}',
               f'tokenizer.pretrained={data["tokenizer"]}',
               f'train_dataloader.batch_size={batch}', f'train_cfg.max_iters={iters}',
               f'default_hooks.checkpoint.interval={iters + 1}', 'default_hooks.logger.interval=1']
    cfg = load_config(config, dict(o.split('=', 1) for o in options[:3]))
    from mllm.registry import DATASETS
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    seq = max(len(dataset.encode(i)['input_ids']) for i in range(len(dataset)))  # padded length
    plan = plan_memory(cfg, gpus=2, precision='fp32', seq_len=seq, overhead_gb=0.0)
    rows = {}
    for stage in stages:
        run_dir = osp.join(work_dir, stage)
        out = subprocess.run(
            [sys.executable, '-m', 'mllm', 'train', config, '--work-dir', run_dir,
             '--deepspeed', f'{stage}_fp32', '--cfg-options', *options],
            capture_output=True, text=True,
            env={**os.environ, 'NPROC_PER_NODE': '2', 'PORT': str(_free_port())})
        estimate = plan['stages'][stage]
        row = dict(plan_mb=estimate['memory_gb'] * 1e3,
                   plan_states_mb=sum(estimate[k] for k in ('weights', 'gradients', 'optimizer',
                                                            'working_set')) * 1e3,
                   plan_activations_mb=estimate['activations_gb'] * 1e3)
        ranks = [osp.join(run_dir, f'peak_memory_rank{r}.json') for r in (0, 1)]
        if out.returncode or not all(osp.exists(p) for p in ranks):
            row['error'] = (out.stderr or out.stdout)[-600:]
        else:
            for r, p in enumerate(ranks):
                with open(p) as f:
                    rank = json.load(f)
                rank['growth_mb'] = rank['peak_rss_mb'] - rank['rss_at_train_start_mb']
                row[f'rank{r}'] = rank
            row['losses'] = _losses(run_dir)
        rows[stage] = row
    return dict(batch_per_rank=batch, iters=iters, seq_len=seq, stages=rows)


def _free_port() -> int:
    """A free local TCP port for torchrun (29500 may be taken by another run)."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _losses(run_dir: str) -> List[float]:
    import glob
    values = []
    for path in sorted(glob.glob(osp.join(run_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            values += [json.loads(line)['loss'] for line in f if '"loss"' in line]
    return values


def recipe_flops(cfg, stage: str = 'finetune', text_tokens: Optional[int] = None,
                 boxes_per_image: int = 20) -> dict:
    """Model FLOPs per training sample of a recipe, from its architecture on the meta
    device (no weights): ``train_flops_per_sample`` with the vision side's forward FLOPs
    counted by ``FlopCounterMode`` over ``encode_images`` (towers, fusion, projectors)."""
    from torch.utils.flop_counter import FlopCounterMode

    import mllm.models  # noqa: F401
    from mllm.models.meta import build_on_meta
    from mllm.registry import TRANSFORMS

    model = build_on_meta(cfg)
    processor = TRANSFORMS.build(cfg.image_processor)
    side = processor.size
    boxes = boxes_per_image if hasattr(model, 'high_res_encoder') else 0
    extra = dict(boxes=[torch.rand(boxes, 4, device='meta') * side]) if boxes else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_images(torch.empty(1, 3, side, side, device='meta'), **extra)
    llm = model.llm.config
    visual = model.num_visual_tokens((side, side)) + boxes
    seq = 1 + visual + (text_tokens or TEXT_TOKENS[stage])
    llm_params = sum(p.numel() for p in model.llm.parameters())
    llm_trainable = any(p.requires_grad for p in model.llm.parameters())
    return dict(seq_len=seq, visual_tokens=visual, vision_forward_flops=counter.get_total_flops(),
                flops_per_sample=train_flops_per_sample(
                    llm_params, llm.num_hidden_layers, llm.hidden_size, seq,
                    counter.get_total_flops(), llm_trainable),
                llm_trainable=llm_trainable, samples=DATASET_SAMPLES[stage])


def bench_project(cfg, stage: str = 'finetune', mfu: float = 0.4,
                  text_tokens: Optional[int] = None) -> dict:
    """8xA100 hours for one epoch of the stage's data at an assumed ``mfu``."""
    result = recipe_flops(cfg, stage, text_tokens)
    result.update(stage=stage, mfu_assumed=mfu, projected_hours_8xA100=project_hours(
        result['flops_per_sample'], result['samples'], mfu))
    return result
