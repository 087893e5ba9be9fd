"""Behaviour of mllm.models (towers, projector, LLaVAModel, LoRA) and of the model-facing
engine code (TrainableCheckpointHook, inference.load_model), on tiny CPU models."""
import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from mllm.datasets.collate import llava_collate
from mllm.datasets.templates import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, build_generation_prompt,
                                     encode_conversation)
from mllm.engine.hooks import TrainableCheckpointHook
from mllm.inference.inference import load_model
from mllm.models import CLIPVisionEncoder, HFCausalLM, MLPProjector, build_tokenizer
from mllm.registry import MODELS

from conftest import TINY_CLIP_CONFIG, TINY_LLM_CONFIG, TINY_NUM_VISUAL_TOKENS

N_IMG = TINY_NUM_VISUAL_TOKENS  # 16 visual tokens per 32 px image
# CLIPVisionModel's weights sit under ``vision_model.`` up to transformers 4.x, at its top in 5.x
VIT = 'vision_model.' if hasattr(CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG)),
                                 'vision_model') else ''


def build(cfg, seed=0, **overrides):
    """Build a LLaVAModel from ``cfg`` with ``overrides``, seeded (same seed, same weights)."""
    torch.manual_seed(seed)
    return MODELS.build(dict(copy.deepcopy(cfg), **overrides))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sample(tokenizer, question, answer, image=True, seed=0):
    """One encoded training sample (vicuna_v1), with a random image when ``image``."""
    text = f'<image>\n{question}' if image else question
    conv = [{'from': 'human', 'value': text}, {'from': 'gpt', 'value': answer}]
    enc = encode_conversation(conv, tokenizer, 'vicuna_v1', num_image_tokens=N_IMG if image else 0)
    image = pixels(1, seed)[0] if image else None
    return dict(input_ids=torch.tensor(enc['input_ids']), labels=torch.tensor(enc['labels']),
                pixel_values=image)


def collate(instances, tokenizer, padding_side='right'):
    return llava_collate(instances, pad_token_id=tokenizer.pad_token_id, padding_side=padding_side)


# ---------------------------------------------------------------- vision encoder


def test_clip_from_pretrained_loads_the_saved_weights(saved_tiny_checkpoints):
    enc = CLIPVisionEncoder(pretrained=saved_tiny_checkpoints['vision'])
    ref = CLIPVisionModel.from_pretrained(saved_tiny_checkpoints['vision'])
    ref_state = ref.state_dict()
    assert enc.model.state_dict().keys() == ref_state.keys()
    for key, value in enc.model.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert enc.out_channels == 32 and enc.patch_size == 8


def test_clip_config_path_random_inits(saved_tiny_checkpoints):
    saved = CLIPVisionModel.from_pretrained(saved_tiny_checkpoints['vision'])
    torch.manual_seed(1)
    a = CLIPVisionEncoder(config=TINY_CLIP_CONFIG)
    torch.manual_seed(2)
    b = CLIPVisionEncoder(config=TINY_CLIP_CONFIG)
    w = VIT + 'embeddings.patch_embedding.weight'
    assert a.model.state_dict()[w].shape == (32, 3, 8, 8)
    assert not torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert not torch.equal(a.model.state_dict()[w], saved.state_dict()[w])
    # load_weights=False takes only the architecture from the folder
    c = CLIPVisionEncoder(pretrained=saved_tiny_checkpoints['vision'], load_weights=False)
    assert c.model.config.hidden_size == 32
    assert not torch.equal(c.model.state_dict()[w], saved.state_dict()[w])


def test_clip_missing_pretrained_is_a_clear_error(tmp_path):
    missing = str(tmp_path / 'no-such-clip')
    with pytest.raises(FileNotFoundError) as err:
        CLIPVisionEncoder(pretrained=missing)
    message = str(err.value)
    assert 'vision encoder' in message and missing in message
    assert 'local folder' in message  # says what to do
    with pytest.raises(ValueError, match='pretrained` or `config'):
        CLIPVisionEncoder()


def test_clip_penultimate_layer_without_cls(saved_tiny_checkpoints):
    enc = CLIPVisionEncoder(pretrained=saved_tiny_checkpoints['vision'], select_layer=-2)
    ref = CLIPVisionModel.from_pretrained(saved_tiny_checkpoints['vision'])
    x = pixels(2)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = enc(x)
    assert feats.shape == (2, N_IMG, 32)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    assert enc.num_visual_tokens((32, 32)) == 16
    assert enc.num_visual_tokens((64, 32)) == 32  # (W // 8) * (H // 8)


def test_clip_cls_patch_keeps_cls_and_last_layer(saved_tiny_checkpoints):
    path = saved_tiny_checkpoints['vision']
    ref = CLIPVisionModel.from_pretrained(path)
    x = pixels(2)
    with torch.no_grad():
        hidden = ref(x, output_hidden_states=True).hidden_states
        with_cls = CLIPVisionEncoder(pretrained=path, select_feature='cls_patch')(x)
        last = CLIPVisionEncoder(pretrained=path, select_layer=-1)(x)
    assert with_cls.shape == (2, N_IMG + 1, 32)
    torch.testing.assert_close(with_cls, hidden[-2], rtol=0, atol=0)
    torch.testing.assert_close(last, hidden[-1][:, 1:], rtol=0, atol=0)
    assert not torch.allclose(last, with_cls[:, 1:])
    assert CLIPVisionEncoder(pretrained=path, select_feature='cls_patch').num_visual_tokens(
        (32, 32)) == N_IMG + 1


@pytest.mark.parametrize('select_layer', [-3, -2, -1, 0, 1, 2])
def test_clip_every_select_layer_matches_hf_hidden_states(saved_tiny_checkpoints, select_layer):
    path = saved_tiny_checkpoints['vision']
    ref = CLIPVisionModel.from_pretrained(path)
    x = pixels(1, seed=select_layer)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states[select_layer]  # (1, 17, 32)
        feats = CLIPVisionEncoder(pretrained=path, select_layer=select_layer,
                                  select_feature='cls_patch')(x)
    torch.testing.assert_close(feats, expected, rtol=1e-6, atol=1e-6)


def test_clip_rejects_bad_options():
    with pytest.raises(ValueError, match='select_layer=-4 is out of range for 2 layers'):
        CLIPVisionEncoder(config=TINY_CLIP_CONFIG, select_layer=-4)  # 3 hidden states
    with pytest.raises(ValueError, match="select_feature must be 'patch' or 'cls_patch'"):
        CLIPVisionEncoder(config=TINY_CLIP_CONFIG, select_feature='avg')


# ---------------------------------------------------------------- LLM and tokenizer


def test_llm_from_pretrained_loads_the_saved_weights(saved_tiny_checkpoints):
    llm = HFCausalLM(pretrained=saved_tiny_checkpoints['llm'], attn_implementation='eager')
    ref = LlamaForCausalLM.from_pretrained(saved_tiny_checkpoints['llm'])
    ref_state = ref.state_dict()
    assert llm.state_dict().keys() == ref_state.keys()
    for key, value in llm.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert llm.dtype == torch.float32 and llm.config._attn_implementation == 'eager'


def test_llm_config_path_random_inits(saved_tiny_checkpoints):
    saved = LlamaForCausalLM.from_pretrained(saved_tiny_checkpoints['llm'])
    torch.manual_seed(0)
    llm = HFCausalLM(config=TINY_LLM_CONFIG)
    assert type(llm).__name__ == 'LlamaForCausalLM'
    assert (llm.config.hidden_size, llm.config.num_hidden_layers, llm.config.vocab_size) == (
        64, 2, 256)
    key = 'model.layers.0.self_attn.q_proj.weight'
    assert not torch.equal(llm.state_dict()[key], saved.state_dict()[key])
    from_folder = HFCausalLM(pretrained=saved_tiny_checkpoints['llm'], load_weights=False)
    assert from_folder.config.hidden_size == 64
    assert not torch.equal(from_folder.state_dict()[key], saved.state_dict()[key])
    assert TINY_LLM_CONFIG['model_type'] == 'llama'  # the caller's dict is not consumed


def test_llm_missing_pretrained_is_a_clear_error(tmp_path):
    missing = str(tmp_path / 'no-such-llm')
    with pytest.raises(FileNotFoundError) as err:
        HFCausalLM(pretrained=missing)
    assert 'LLM' in str(err.value) and missing in str(err.value)
    assert 'local folder' in str(err.value)
    with pytest.raises(ValueError, match='torch_dtype'):
        HFCausalLM(config=TINY_LLM_CONFIG, torch_dtype='float64')


def test_tokenizer_loads_from_the_checkpoint_folder(saved_tiny_checkpoints, tiny_tokenizer):
    tok = build_tokenizer(dict(pretrained=saved_tiny_checkpoints['tokenizer']))
    text = 'What colour is the shape? It is red.'
    assert tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.encode(text)[0] == 1  # <s>
    assert (tok.pad_token_id, tok.eos_token_id) == (3, 2)
    assert build_tokenizer(tiny_tokenizer) is tiny_tokenizer


def test_llava_from_pretrained_towers(tiny_model_cfg, saved_tiny_checkpoints):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg['llm'] = dict(type='HFCausalLM', pretrained=saved_tiny_checkpoints['llm'],
                      attn_implementation='eager')
    cfg['vision_encoder'] = dict(type='CLIPVisionEncoder',
                                 pretrained=saved_tiny_checkpoints['vision'])
    model = MODELS.build(cfg)
    llm_ref = LlamaForCausalLM.from_pretrained(saved_tiny_checkpoints['llm']).state_dict()
    clip_ref = CLIPVisionModel.from_pretrained(saved_tiny_checkpoints['vision']).state_dict()
    key = 'model.layers.1.mlp.down_proj.weight'
    assert torch.equal(model.llm.state_dict()[key], llm_ref[key])
    key = VIT + 'encoder.layers.0.self_attn.k_proj.weight'
    assert torch.equal(model.vision_encoder.model.state_dict()[key], clip_ref[key])
    # the projector is sized from the two towers
    assert model.projector.linear_1.weight.shape == (64, 32)
    assert model.projector.linear_2.weight.shape == (64, 64)


# ---------------------------------------------------------------- projector


@pytest.mark.parametrize('depth', [1, 2, 3])
def test_projector_layer_names(depth):
    proj = MLPProjector(32, 64, depth=depth)
    expected = {f'linear_{i}.{p}' for i in range(1, depth + 1) for p in ('weight', 'bias')}
    assert set(proj.state_dict()) == expected
    for key in proj.state_dict():
        assert not any(part.isdigit() for part in key.split('.')), key  # no Sequential indices
    assert proj.linear_1.weight.shape == (64, 32)
    for i in range(2, depth + 1):
        assert getattr(proj, f'linear_{i}').weight.shape == (64, 64)


def test_projector_forward_is_linear_gelu_linear():
    torch.manual_seed(0)
    proj = MLPProjector(32, 64, depth=3)
    x = torch.randn(2, 5, 32)
    expected = proj.linear_3(F.gelu(proj.linear_2(F.gelu(proj.linear_1(x)))))
    torch.testing.assert_close(proj(x), expected)
    assert proj(x).shape == (2, 5, 64)
    with pytest.raises(ValueError, match='depth must be >= 1, got 0'):
        MLPProjector(32, 64, depth=0)


@pytest.mark.parametrize('in_channels, expected', [
    (1024, 20_979_712),  # CLIP ViT-L -> 4096 (LLaVA-1.5 7B mlp2x_gelu)
    (3072, 29_368_320),  # ConvLLaVA stage-5 width -> 4096; REFERENCE §3: 29.4 M
])
def test_projector_parameter_count_on_meta(in_channels, expected):
    with torch.device('meta'):
        proj = MLPProjector(in_channels, 4096, depth=2)
    assert proj.linear_1.weight.is_meta
    n = sum(p.numel() for p in proj.parameters())
    assert n == expected == in_channels * 4096 + 4096 + 4096 * 4096 + 4096
    assert round(n / 1e6, 1) in (21.0, 29.4)


# ---------------------------------------------------------------- LLaVAModel: freezing


@pytest.mark.parametrize('trainable, parts', [
    (['projector'], {'projector'}),
    (['projector', 'llm'], {'projector', 'llm'}),
    (['vision_encoder', 'projector', 'llm'], {'vision_encoder', 'projector', 'llm'}),
])
def test_freezing_per_stage(tiny_model_cfg, trainable, parts):
    model = build(tiny_model_cfg, trainable=trainable)
    # the ViT layers after select_layer=-2 and post_layernorm never reach the output: frozen
    unused = (f'vision_encoder.model.{VIT}encoder.layers.1.',
              f'vision_encoder.model.{VIT}post_layernorm.')
    for name, param in model.named_parameters():
        expected = name.split('.')[0] in parts and not name.startswith(unused)
        assert param.requires_grad == expected, name
    all_of = {part: {n for n, _ in model.named_parameters()
                     if n.startswith(part + '.') and not n.startswith(unused)}
              for part in ('vision_encoder', 'projector', 'llm')}
    assert trainable_names(model) == set().union(*(all_of[p] for p in parts))
    assert len(all_of['vision_encoder']) > 10


def test_freezing_a_sub_prefix(tiny_model_cfg):
    model = build(tiny_model_cfg, trainable=['projector', 'llm.model.layers.1'])
    names = trainable_names(model)
    assert any(n.startswith('llm.model.layers.1.') for n in names)
    assert not any(n.startswith(('llm.model.layers.0.', 'llm.lm_head')) for n in names)


@pytest.mark.parametrize('bad', ['vision', 'proj', 'projector.linear_9'])
def test_unknown_trainable_prefix_lists_the_parts(tiny_model_cfg, bad):
    with pytest.raises(ValueError) as err:
        build(tiny_model_cfg, trainable=['projector', bad])
    message = str(err.value)
    assert repr(bad) in message
    assert "['llm', 'projector', 'vision_encoder']" in message


# ---------------------------------------------------------------- LLaVAModel: the merge


def capture_inputs_embeds(model):
    """Record the ``inputs_embeds`` the LLM's first decoder layer gets (the loss path runs
    the decoder layers itself, to apply the last MLP and the LM head only where labels are
    learned)."""
    seen = []

    def hook(module, args):
        seen.append(args[0].detach().clone())
    return seen, model.llm.get_decoder().layers[0].register_forward_pre_hook(hook)


def test_image_features_land_exactly_at_the_image_tokens(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg).eval()
    batch = collate([sample(tiny_tokenizer, 'What colour is the shape?', 'red', seed=1),
                     sample(tiny_tokenizer, 'How many?', 'It is one circle.', seed=2)],
                    tiny_tokenizer)
    ids = batch['input_ids']
    seen, handle = capture_inputs_embeds(model)
    with torch.no_grad():
        model(**batch, mode='tensor')
        expected = model.projector(model.vision_encoder(batch['pixel_values']))  # (2, 16, 64)
    handle.remove()
    embeds = seen[0]  # (2, T, 64)
    image_mask = ids == IMAGE_TOKEN_INDEX
    assert image_mask.sum(1).tolist() == [N_IMG, N_IMG]
    for row in range(2):
        torch.testing.assert_close(embeds[row][image_mask[row]], expected[row], rtol=0, atol=0)
        text_ids = ids[row][~image_mask[row]]
        table = model.llm.get_input_embeddings().weight
        torch.testing.assert_close(embeds[row][~image_mask[row]], table[text_ids], rtol=0, atol=0)
    # the batch was not mutated
    assert (batch['input_ids'] == IMAGE_TOKEN_INDEX).sum() == 2 * N_IMG


def test_image_token_count_mismatch_names_both_numbers(tiny_model_cfg):
    model = build(tiny_model_cfg)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN_INDEX] * (N_IMG - 1) + [6, 7]])
    with pytest.raises(ValueError) as err:
        model(ids, labels=ids.clamp(min=0), pixel_values=pixels(1))
    message = str(err.value)
    assert f'1 images give {N_IMG} features' in message
    assert f'{N_IMG - 1} image-token slots' in message
    two_images = torch.tensor([[1] + [IMAGE_TOKEN_INDEX] * N_IMG + [6]])
    with pytest.raises(ValueError, match=f'2 images give {2 * N_IMG} features, '
                                         f'but the text has {N_IMG} image-token slots'):
        model(two_images, pixel_values=pixels(2))
    with pytest.raises(ValueError, match=f'{N_IMG} image-token slots but no images'):
        model(two_images, pixel_values=None)


def test_loss_is_shifted_cross_entropy_over_answer_tokens(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg).eval()
    batch = collate([sample(tiny_tokenizer, 'What colour is the shape?', 'It is red.', seed=1),
                     sample(tiny_tokenizer, 'Describe this image.', 'a dog', seed=2)],
                    tiny_tokenizer)
    labels = batch['labels']
    assert (labels != IGNORE_INDEX).sum() >= 5
    with torch.no_grad():
        loss = model(**batch, mode='loss')['loss']
        logits = model(**batch, mode='tensor')  # (B, T, V)
    assert logits.shape == (*batch['input_ids'].shape, 256)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, manual)
    # the same, summed over the kept positions by hand
    keep = labels[:, 1:] != IGNORE_INDEX
    logp = logits[:, :-1].log_softmax(-1)[keep]
    by_hand = -logp.gather(1, labels[:, 1:][keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 1.5  # random-init scale
    with pytest.raises(ValueError, match="mode must be 'loss' or 'tensor'"):
        model(**batch, mode='predict')


def test_right_padding_does_not_change_a_sample(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg).eval()
    short = sample(tiny_tokenizer, 'What colour?', 'red', seed=1)
    long = sample(tiny_tokenizer, 'Describe this image. How many are there?',
                  'The picture shows a blue circle and a green square.', seed=2)
    n = len(short['input_ids'])
    assert len(long['input_ids']) > n + 5
    alone = collate([short], tiny_tokenizer)
    batch = collate([short, long], tiny_tokenizer)
    assert batch['attention_mask'][0].sum() == n
    with torch.no_grad():
        logits_alone = model(**alone, mode='tensor')[0]
        logits_batch = model(**batch, mode='tensor')[0, :n]
        loss_alone = model(**alone)['loss']
        only_short = dict(batch, labels=batch['labels'].clone())
        only_short['labels'][1] = IGNORE_INDEX  # the long sample contributes nothing
        loss_batch = model(**only_short)['loss']
    torch.testing.assert_close(logits_batch, logits_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_batch, loss_alone, rtol=1e-5, atol=1e-6)


def test_text_only_and_image_samples_in_one_batch(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg).eval()
    text = sample(tiny_tokenizer, 'hello there!', 'hello!', image=False)
    image = sample(tiny_tokenizer, 'What colour is the shape?', 'red', seed=3)
    batch = collate([text, image], tiny_tokenizer)
    assert batch['pixel_values'].shape == (1, 3, 32, 32)
    seen, handle = capture_inputs_embeds(model)
    with torch.no_grad():
        loss = model(**batch)['loss']
        text_alone = model(**collate([text], tiny_tokenizer))['loss']  # pixel_values None
        feats = model.encode_images(batch['pixel_values'])  # (16, C): the one image's tokens
    handle.remove()
    assert torch.isfinite(loss) and torch.isfinite(text_alone)
    ids, embeds = batch['input_ids'], seen[0]
    table = model.llm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0], table[ids[0]], rtol=0, atol=0)  # no image in row 0
    torch.testing.assert_close(embeds[1][ids[1] == IMAGE_TOKEN_INDEX], feats, rtol=0, atol=0)


# ---------------------------------------------------------------- LLaVAModel: training


def test_a_few_steps_overfit_one_batch(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg, trainable=['vision_encoder', 'projector', 'llm']).train()
    batch = collate([sample(tiny_tokenizer, 'What colour is the shape?', 'It is red.', seed=1),
                     sample(tiny_tokenizer, 'How many?', 'two', seed=2),
                     sample(tiny_tokenizer, 'hello there!', 'hello!', image=False)],
                    tiny_tokenizer)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(20):
        loss = model(**batch)['loss']
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[0] > 4.5
    assert losses[-1] < 0.1 * losses[0], losses


def test_projector_only_training_changes_only_the_projector(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg, trainable=['projector']).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = collate([sample(tiny_tokenizer, 'What colour?', 'It is red.', seed=1)], tiny_tokenizer)
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch)['loss'].backward()
    optim.step()
    changed = {k.split('.')[0] for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert changed == {'projector'}
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('projector'))


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch)['loss']
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_model_cfg, tiny_tokenizer):
    trainable = ['vision_encoder', 'projector', 'llm']
    plain = build(tiny_model_cfg, trainable=trainable)
    ckpt = build(tiny_model_cfg, trainable=trainable, gradient_checkpointing=True)
    assert ckpt.llm.is_gradient_checkpointing and ckpt.vision_encoder.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    batch = collate([sample(tiny_tokenizer, 'What colour?', 'It is red.', seed=1),
                     sample(tiny_tokenizer, 'How many are there?', 'two', seed=2)],
                    tiny_tokenizer)
    calls = []
    # a sublayer's hooks: transformers 5 checkpoints a decoder layer's ``forward`` (not
    # ``__call__``), so the layer's own hooks run once, its submodules' again in backward
    layers = dict(llm=ckpt.llm.model.layers[0].mlp,
                  vit=ckpt.vision_encoder.vision.encoder.layers[0].mlp)
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
               for name, layer in layers.items()]
    loss_c, grads_c = loss_and_grads(ckpt, batch)
    for handle in handles:
        handle.remove()
    # each layer started again in backward: checkpointing is really on in both towers
    assert sorted(calls) == ['llm', 'llm', 'vit', 'vit']
    loss_p, grads_p = loss_and_grads(plain, batch)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=1e-6)
    # every trainable parameter gets a gradient (DDP waits for all of them); only the
    # ViT parts after select_layer=-2 have none, and they are frozen
    assert grads_c.keys() == grads_p.keys() == trainable_names(plain)
    unused = {n for n, _ in plain.named_parameters()} - set(grads_p)
    assert unused and all(n.startswith((f'vision_encoder.model.{VIT}encoder.layers.1.',
                                        f'vision_encoder.model.{VIT}post_layernorm.'))
                          for n in unused)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_with_frozen_llm_still_trains_the_projector(tiny_model_cfg,
                                                                          tiny_tokenizer):
    model = build(tiny_model_cfg, trainable=['projector'], gradient_checkpointing=True)
    batch = collate([sample(tiny_tokenizer, 'What colour?', 'red', seed=1)], tiny_tokenizer)
    _, grads = loss_and_grads(model, batch)
    assert set(grads) == {n for n, _ in model.projector.named_parameters(prefix='projector')}
    assert all(g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------- LoRA / QLoRA


def test_lora_trains_only_adapters_and_projector(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg, lora=dict(r=4, alpha=8))
    names = trainable_names(model)
    assert names and all('lora_' in n or n.startswith('projector.') for n in names)
    assert {n for n in names if n.startswith('projector.')} == {
        'projector.linear_1.weight', 'projector.linear_1.bias',
        'projector.linear_2.weight', 'projector.linear_2.bias'}
    # 'all-linear' = every linear of the decoder layers, not the LM head
    hidden, mlp, layers, r = 64, 128, 2, 4
    # (in, out) of q k v o, gate up, down
    linears = [(hidden, hidden)] * 4 + [(hidden, mlp)] * 2 + [(mlp, hidden)]
    expected = layers * sum(r * (i + o) for i, o in linears)
    adapters = sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)
    assert adapters == expected == 8704
    assert not any('lm_head' in n and 'lora_' in n for n, _ in model.named_parameters())
    lora_a = [n for n in names if 'lora_A' in n]
    assert len(lora_a) == layers * len(linears)
    assert model.llm.peft_config['default'].lora_alpha == 8
    # B starts at zero: the adapted model equals the base model until it trains
    model.eval()
    batch = collate([sample(tiny_tokenizer, 'What colour?', 'red', seed=1)], tiny_tokenizer)
    with torch.no_grad():
        adapted = model(**batch, mode='tensor')
        with model.llm.disable_adapter():
            torch.testing.assert_close(adapted, model(**batch, mode='tensor'), rtol=0, atol=0)
    model.train()
    loss = model(**batch)['loss']
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if 'lora_B' in n)


def test_lora_rejects_unknown_options(tiny_model_cfg):
    with pytest.raises(ValueError, match=r"unknown LoRA options \['rank'\]"):
        build(tiny_model_cfg, lora=dict(rank=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only error')
def test_qlora_needs_cuda(tiny_model_cfg, saved_tiny_checkpoints):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg['llm'] = dict(type='HFCausalLM', pretrained=saved_tiny_checkpoints['llm'],
                      quantization='4bit')
    with pytest.raises(RuntimeError, match='CUDA'):
        MODELS.build(dict(cfg, lora=dict(r=4, alpha=8)))
    cfg['llm'] = dict(tiny_model_cfg['llm'], quantization='4bit')  # random init: not ignored
    with pytest.raises(RuntimeError, match='CUDA'):
        MODELS.build(dict(cfg, lora=dict(r=4, alpha=8)))
    cfg['llm']['quantization'] = '3bit'
    with pytest.raises(ValueError, match="'4bit' or '8bit', got '3bit'"):
        MODELS.build(cfg)


# ---------------------------------------------------------------- generation


def test_generate_left_padded_batch_matches_single_samples(tiny_model_cfg, tiny_tokenizer):
    model = build(tiny_model_cfg, seed=3).eval()
    convs = [[{'from': 'human', 'value': '<image>\nWhat colour is the shape?'}],
             [{'from': 'human', 'value': '<image>\nDescribe this image. How many are there?'}]]
    items = [dict(input_ids=build_generation_prompt(c, tiny_tokenizer, 'vicuna_v1',
                                                    num_image_tokens=N_IMG),
                  pixel_values=pixels(1, seed=i)[0]) for i, c in enumerate(convs)]
    assert len(items[1]['input_ids']) > len(items[0]['input_ids'])
    kwargs = dict(max_new_tokens=6, pad_token_id=tiny_tokenizer.pad_token_id,
                  eos_token_id=tiny_tokenizer.eos_token_id)

    def generate(instances):
        batch = llava_collate(instances, pad_token_id=tiny_tokenizer.pad_token_id,
                              padding_side='left')
        return model.generate(batch['input_ids'], attention_mask=batch['attention_mask'],
                              pixel_values=batch['pixel_values'], **kwargs)

    batched = generate(items)
    assert batched.shape[0] == 2 and batched.shape[1] <= 6  # only new tokens come back
    for row, item in enumerate(items):
        alone = generate([item])[0]
        assert len(alone) >= 1
        assert batched[row, :len(alone)].tolist() == alone.tolist()
        # after an early eos the batch row is padded
        assert set(batched[row, len(alone):].tolist()) <= {tiny_tokenizer.pad_token_id}


# ---------------------------------------------------------------- checkpoints


def fake_runner(model):
    return types.SimpleNamespace(model=model, logger=logging.getLogger('test'))


def test_trainable_checkpoint_hook_round_trip(tiny_model_cfg):
    model = build(tiny_model_cfg, seed=0, trainable=['projector', 'llm.lm_head'])
    hook = TrainableCheckpointHook()
    checkpoint = dict(state_dict=model.state_dict(), meta=dict(epoch=1))
    hook.before_save_checkpoint(fake_runner(model), checkpoint)
    assert set(checkpoint['state_dict']) == trainable_names(model) == {
        'projector.linear_1.weight', 'projector.linear_1.bias', 'projector.linear_2.weight',
        'projector.linear_2.bias', 'llm.lm_head.weight'}
    assert checkpoint['meta'] == dict(epoch=1, trainable_only=True)

    fresh = build(tiny_model_cfg, seed=1, trainable=['projector', 'llm.lm_head'])
    fresh_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    hook.after_load_checkpoint(fake_runner(fresh), checkpoint)
    state = checkpoint['state_dict']
    assert set(state) == set(fresh_state)
    fresh.load_state_dict(state, strict=True)
    for key, value in fresh.state_dict().items():
        source = model if key in trainable_names(model) else None
        expected = source.state_dict()[key] if source is not None else fresh_state[key]
        assert torch.equal(value, expected), key


def test_trainable_checkpoint_hook_ignores_full_checkpoints(tiny_model_cfg):
    model = build(tiny_model_cfg)
    checkpoint = dict(state_dict={'projector.linear_1.bias': torch.zeros(64)}, meta={})
    TrainableCheckpointHook().after_load_checkpoint(fake_runner(model), checkpoint)
    assert list(checkpoint['state_dict']) == ['projector.linear_1.bias']


def pretrained_cfg(tiny_model_cfg, saved_tiny_checkpoints):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg['llm'] = dict(type='HFCausalLM', pretrained=saved_tiny_checkpoints['llm'],
                      attn_implementation='eager')
    cfg['vision_encoder'] = dict(type='CLIPVisionEncoder',
                                 pretrained=saved_tiny_checkpoints['vision'])
    return Config(dict(model=cfg))


def test_load_model_takes_a_trainable_only_checkpoint(tiny_model_cfg, saved_tiny_checkpoints,
                                                      tmp_path):
    cfg = pretrained_cfg(tiny_model_cfg, saved_tiny_checkpoints)
    torch.manual_seed(5)
    trained = MODELS.build(cfg.model)
    checkpoint = dict(state_dict=trained.state_dict(), meta={})
    TrainableCheckpointHook().before_save_checkpoint(fake_runner(trained), checkpoint)
    path = str(tmp_path / 'iter_1.pth')
    torch.save(checkpoint, path)
    torch.manual_seed(6)  # a different projector init, overwritten by the checkpoint
    model = load_model(cfg, path)
    assert not model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    saved_llm = LlamaForCausalLM.from_pretrained(saved_tiny_checkpoints['llm']).state_dict()
    key = 'model.layers.0.mlp.up_proj.weight'
    assert torch.equal(model.llm.state_dict()[key], saved_llm[key])


def test_load_model_rejects_checkpoints_that_do_not_fit(tiny_model_cfg, saved_tiny_checkpoints,
                                                        tmp_path):
    cfg = pretrained_cfg(tiny_model_cfg, saved_tiny_checkpoints)
    model = MODELS.build(cfg.model)
    state = {k: v for k, v in model.state_dict().items() if k.startswith('projector.')}
    unknown = dict(state, **{'projector.linear_3.weight': torch.zeros(64, 64)})
    torch.save(dict(state_dict=unknown), tmp_path / 'unknown.pth')
    with pytest.raises(ValueError, match=r"unexpected \['projector.linear_3.weight'\]"):
        load_model(cfg, str(tmp_path / 'unknown.pth'))
    missing = {k: v for k, v in state.items() if k != 'projector.linear_2.bias'}
    torch.save(dict(state_dict=missing), tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match=r"missing \['projector.linear_2.bias'\]"):
        load_model(cfg, str(tmp_path / 'missing.pth'))


def test_images_of_different_shapes_are_encoded_in_sample_order(tiny_model_cfg):
    """Keep-aspect images / slices come as a list; features land in the same order as a
    per-image loop would put them."""
    import torch
    from mllm.datasets.collate import llava_collate
    from mllm.registry import MODELS

    torch.manual_seed(0)
    model = MODELS.build(tiny_model_cfg).eval()
    square, wide, square2 = torch.randn(3, 32, 32), torch.randn(3, 32, 64), torch.randn(3, 32, 32)
    items = [dict(input_ids=[1] + [-200] * 16 + [5], pixel_values=square),
             dict(input_ids=[1] + [-200] * (32 + 16) + [6], pixel_values=[wide, square2])]
    batch = llava_collate(items)
    assert isinstance(batch['pixel_values'], list) and len(batch['pixel_values']) == 3
    with torch.no_grad():
        feats = model.encode_images(batch['pixel_values'])
        expected = torch.cat([model.projector(model.vision_encoder(x[None]))[0]
                              for x in (square, wide, square2)])
        assert torch.allclose(feats, expected, atol=1e-5)
        embeds = model.embed_inputs(batch['input_ids'], batch['pixel_values'])
    mask = batch['input_ids'] == -200
    assert torch.allclose(embeds[mask], expected, atol=1e-5)
