"""LLaVA-style composition: vision encoder -> projector -> LLM.

The dataset expands every ``<image>`` into as many ``IMAGE_TOKEN_INDEX`` sentinels as the
encoder yields tokens, so sequence lengths never change inside the model: the merge is a
mask plus ``masked_scatter``.
"""
from typing import Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist
from mmengine.model import BaseModel

from mllm.datasets.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mllm.models.llms import (checkpointing_policy, decode_learned_rows,
                              enable_gradient_checkpointing, fuse_elementwise,
                              layers_to_checkpoint, set_checkpointed_layers)
from mllm.models.lora import apply_lora
from mllm.models.varlen_attention import segment_starts, supports_varlen
from mllm.registry import MODELS

# Decoder families whose logits are plain ``lm_head(hidden)``: the loss may skip the head
# on unlabelled positions (Llama/Vicuna/Yi, Phi-3, Mistral, Qwen2).
PLAIN_HEAD_LLMS = ('llama', 'phi3', 'mistral', 'qwen2')


def set_trainable(model: torch.nn.Module, trainable: Sequence[str]) -> None:
    """Freeze every parameter except those under the ``trainable`` name prefixes.

    LoRA adapter weights stay trainable whenever adapters exist; parameters a module
    reports as ``unused_parameters()`` (never reaching the output) stay frozen.
    """
    names = [n for n, _ in model.named_parameters()]
    for prefix in trainable:
        if not any(n == prefix or n.startswith(prefix + '.') for n in names):
            raise ValueError(f'trainable entry {prefix!r} matches no parameter; top-level parts '
                             f'are {sorted({n.split(".")[0] for n in names})}')
    for name, param in model.named_parameters():
        param.requires_grad = ('lora_' in name or
                               any(name == p or name.startswith(p + '.') for p in trainable))
    for module in model.modules():
        for param in getattr(module, 'unused_parameters', lambda: ())():
            param.requires_grad = False


def weight_origin(model: torch.nn.Module, key: str) -> Optional[str]:
    """Where the built model's tensor ``key`` got its value: 'pretrained' (a part read from
    its ``pretrained`` files), 'config' (a part the config builds at random on purpose, from
    ``config=``: the tiny test recipes), or None (layers that always start random:
    projectors, fusion, ConvLLaVA's new 5th stage, LoRA adapters). Strict loading
    (``--load-from``, ``convert hf-to-pth``) needs None-tensors from the checkpoint."""
    name, _, rest = key.partition('.')
    part = getattr(model, name, None)
    if part is None or 'lora_' in key:
        return None
    origin = getattr(part, 'weight_origin', None)
    if callable(origin):
        return origin(rest)
    config = getattr(part, 'config', None)
    if config is not None and hasattr(config, 'model_type'):  # an HF model (the LLM)
        return 'pretrained' if getattr(config, '_name_or_path', '') else 'config'
    return None


@MODELS.register_module()
class LLaVAModel(BaseModel):
    """Vision encoder + projector + causal LLM.

    Args:
        llm: LLM config (``HFCausalLM``); recipes get it from the top-level ``llm`` key.
        vision_encoder: encoder config; recipes get it from the top-level ``vision_encoder``.
        projector: projector config; ``in_channels``/``out_channels`` are filled in.
            Defaults to ``mlp2x_gelu``.
        trainable: parameter-name prefixes that train, e.g. ``('projector',)`` for
            pretraining or ``('projector', 'llm')`` for finetuning. Everything else is frozen.
        lora: peft LoRA options for the LLM (see ``mllm.models.lora``). Defaults to None.
        gradient_checkpointing: recompute activations in the backward pass: True (every
            LLM layer and the vision encoder), False, a number K (the first K LLM layers),
            ``dict(llm=K or bool, vision=bool)``, or 'auto', which ``mllm train`` resolves
            to the fewest layers its memory plan needs (``mllm.bench.memory``); an
            unresolved 'auto' refuses to train. ``per_batch=dict(room_gb, kept,
            checkpointed)`` in the dict (what 'auto' resolves to) re-chooses the LLM layers
            for each training micro-batch from its token count: the fewest whose activations
            fit ``room_gb`` (``layers_to_checkpoint``), so short batches recompute less.
        answer_only_last_layer: in the loss, run the LLM's last MLP only where a label is
            learned (exact: nothing reads the other positions). Defaults to True; False is
            HF's full last layer, for comparison.
        fused_elementwise: run the LLM's RMSNorms and SwiGLU products as compiled kernels
            when training on CUDA (``mllm.models.llms.fuse_elementwise``): fewer memory
            passes and less activation memory per layer. Defaults to False (HF's modules).
    """

    def __init__(self,
                 llm: dict,
                 vision_encoder: dict,
                 projector: dict = dict(type='MLPProjector', depth=2),
                 trainable: Sequence[str] = ('projector',),
                 lora: Optional[dict] = None,
                 gradient_checkpointing: Union[bool, int, str, dict] = False,
                 answer_only_last_layer: bool = True,
                 fused_elementwise: bool = False,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.answer_only_last_layer = answer_only_last_layer
        self.vision_encoder = MODELS.build(vision_encoder)
        self.llm = apply_lora(MODELS.build(llm), lora)
        self.projector = MODELS.build(projector, default_args=dict(
            in_channels=self.vision_encoder.out_channels,
            out_channels=self.llm.config.hidden_size))
        set_trainable(self, trainable)
        self.fused_elementwise = fused_elementwise
        if fused_elementwise:
            fuse_elementwise(self.llm)
        self.gradient_checkpointing = gradient_checkpointing
        llm_layers, vision = checkpointing_policy(gradient_checkpointing)
        self.per_batch_checkpointing = (gradient_checkpointing.get('per_batch')
                                        if isinstance(gradient_checkpointing, dict) else None)
        self.checkpointed_layers = None  # the last training micro-batch's, with per_batch
        if llm_layers is not False or self.per_batch_checkpointing:  # None: every layer
            enable_gradient_checkpointing(self.llm, 0 if llm_layers is False else llm_layers)
        if vision:
            self.vision_encoder.set_grad_checkpointing(True)

    def encode_images(self, pixel_values: Union[torch.Tensor, Sequence[torch.Tensor]],
                      boxes: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Images -> visual tokens (sum of N_i, C_llm) in image order.

        ``pixel_values`` is a (B_img, 3, H, W) batch, or a list of (3, H_i, W_i) images of
        different shapes (keep-aspect resizing, slices); images of one shape are encoded
        together by ``_encode_same_shape``. ``boxes`` (one (n_i, 4) tensor per image) is for
        models with object tokens (``MGLLaVAModel``).
        """
        if boxes is not None and len(boxes) != len(pixel_values):
            raise ValueError(f'{len(pixel_values)} images but {len(boxes)} box lists')
        if isinstance(pixel_values, torch.Tensor):
            feats = self._encode_same_shape(pixel_values, boxes)
            # a (B, N, C) tensor when every image has N tokens, else one tensor per image
            return feats.flatten(0, 1) if isinstance(feats, torch.Tensor) else torch.cat(feats)
        by_shape = {}
        for i, image in enumerate(pixel_values):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        per_image = [None] * len(pixel_values)
        for indices in by_shape.values():
            feats = self._encode_same_shape(torch.stack([pixel_values[i] for i in indices]),
                                            None if boxes is None else [boxes[i] for i in indices])
            for i, f in zip(indices, feats):
                per_image[i] = f
        return torch.cat(per_image)

    def _encode_same_shape(self, pixel_values: torch.Tensor,
                           boxes: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C_llm); the projector gets the feature grid (h, w)."""
        if boxes is not None and any(len(b) for b in boxes):
            raise ValueError(f'{type(self).__name__} has no object tokens, but the batch has boxes '
                             '(remove box_file from the dataset, or use MGLLaVAModel)')
        feature_grid = getattr(self.vision_encoder, 'feature_grid', None)
        grid = feature_grid(pixel_values.shape[:-3:-1]) if feature_grid else None  # (W, H) in
        return self.projector(self.vision_encoder(pixel_values), grid_size=grid)

    def dummy_pixel_values(self, device) -> torch.Tensor:
        """One blank image (1, 3, S, S) for the vision tower: S is a ViT's native size or
        one output stride of a convolutional encoder (a single token). It must take the
        real images' code path: at another size HF's CLIP interpolates its position
        embedding by reading the weight outside the embedding's forward, which ZeRO-3
        does not gather (measured: the 2-process run died)."""
        config = getattr(getattr(self.vision_encoder, 'model', None), 'config', None)
        side = (getattr(config, 'image_size', None) or
                getattr(self.vision_encoder, 'stride', None) or 224)
        return torch.zeros(1, 3, side, side, device=device)

    def num_visual_tokens(self, unit_size) -> int:
        """Tokens the LLM sees for one image tensor of ``unit_size`` = (W, H): a resampler's
        query count, else the encoder's token count."""
        return (getattr(self.projector, 'num_queries', None) or
                self.vision_encoder.num_visual_tokens(unit_size))

    def embed_inputs(self, input_ids: torch.Tensor,
                     pixel_values: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
                     boxes: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Token embeddings with visual features scattered into the image-sentinel slots."""
        image_mask = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        embed = self.llm.get_input_embeddings()
        inputs_embeds = embed(input_ids.masked_fill(image_mask, 0))  # (B, T, C)
        num_slots = int(image_mask.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if num_slots:
                raise ValueError(f'the batch has {num_slots} image-token slots but no images')
            if self.training and dist.is_initialized() and dist.get_world_size() > 1:
                # ranks whose batch has images run the vision tower: ZeRO-3 gathers its
                # weights and every rank reduces its gradients, so a text-only rank must run
                # it too or the collectives no longer pair up (a hang). One blank image,
                # added with weight 0: the loss and the gradients are unchanged.
                inputs_embeds = inputs_embeds + 0 * self.encode_images(
                    self.dummy_pixel_values(inputs_embeds.device)).sum()
            return inputs_embeds
        feats = self.encode_images(pixel_values, boxes=boxes)  # (sum N_i, C)
        if feats.shape[0] != num_slots:
            raise ValueError(
                f'image features do not match the image tokens in the text: {len(pixel_values)} '
                f'images give {feats.shape[0]} features, but the text has {num_slots} '
                'image-token slots (is the image processor sized for this vision encoder?)')
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1),
                                            feats.to(inputs_embeds.dtype))

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, mode: str = 'loss',
                boxes: Optional[Sequence[torch.Tensor]] = None,
                position_ids: Optional[torch.Tensor] = None,
                **unused) -> Dict[str, torch.Tensor]:
        """``position_ids`` without ``attention_mask`` is a packed batch
        (``packed_llava_collate``, ``flat_llava_collate``): every sample attends only to
        itself, through per-segment SDPA where the LLM supports it
        (``mllm.models.varlen_attention``), else a block-diagonal mask."""
        if mode not in ('loss', 'tensor'):
            raise ValueError(f"mode must be 'loss' or 'tensor' (use generate() to predict), "
                             f'got {mode!r}')
        if self.gradient_checkpointing == 'auto' and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "gradient_checkpointing='auto' is resolved from the memory plan by `mllm train` "
                '(mllm.bench.memory.resolve_auto_checkpointing); a model built another way needs '
                'True, False, a layer count or dict(llm=K, vision=bool)')
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, boxes=boxes)
        per_batch = self.per_batch_checkpointing and self.training and torch.is_grad_enabled()
        if per_batch:
            tokens = inputs_embeds.shape[0] * inputs_embeds.shape[1]  # padding included
            self.checkpointed_layers = set_checkpointed_layers(self.llm, layers_to_checkpoint(
                tokens, self.llm.config.num_hidden_layers, **self.per_batch_checkpointing))
        if position_ids is not None and attention_mask is None:
            attention_mask = self._packed_attention_mask(position_ids, inputs_embeds.dtype)
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False)
        if mode == 'tensor':
            return self.llm(**kwargs).logits
        if labels is not None and self._decoder_and_head() is not None:
            out = {'loss': self._answer_loss(labels, **kwargs)}
        else:
            out = {'loss': self.llm(labels=labels, **kwargs).loss}
        if per_batch:  # logged beside the loss (no 'loss' in the name: not summed into it)
            out['ckpt_layers'] = torch.tensor(float(self.checkpointed_layers),
                                              device=out['loss'].device)
        return out

    def _decoder_and_head(self):
        """(decoder, lm_head) of LLMs whose logits are just ``lm_head(hidden)`` (no logit
        scaling or soft-capping), else None."""
        if getattr(self.llm.config, 'model_type', None) not in PLAIN_HEAD_LLMS:
            return None
        return self.llm.get_decoder(), self.llm.get_output_embeddings()

    def _answer_loss(self, labels: torch.Tensor, **llm_inputs) -> torch.Tensor:
        """HF's causal-LM loss, with the LM head applied only where a label is learned.

        Most positions are image tokens, the system prompt and questions (label
        ``IGNORE_INDEX``); HF computes (B, T, vocab) logits for all of them and drops them
        in the loss. Same mean cross-entropy over the same targets, a fraction of the
        head's FLOPs and logits memory (a 128K vocabulary makes that large). With
        ``answer_only_last_layer`` the last decoder layer's MLP and the final norm run at
        those positions only too (``decode_learned_rows``).
        """
        decoder, head = self._decoder_and_head()
        targets = labels[:, 1:]  # position t predicts token t + 1
        learned = targets != IGNORE_INDEX  # (B, T - 1)
        rows = torch.nn.functional.pad(learned, (0, 1), value=False)  # (B, T)
        if self.answer_only_last_layer:
            hidden = decode_learned_rows(decoder, rows=rows, **llm_inputs)  # (N, C)
        else:
            hidden = decoder(**llm_inputs).last_hidden_state[:, :-1][learned]
        logits = head(hidden)  # (N, vocab)
        return torch.nn.functional.cross_entropy(logits.float(), targets[learned])

    def _packed_attention_mask(self, position_ids: torch.Tensor,
                               dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The attention mask of a packed batch: segment boundaries (1-D, no T x T mask)
        for LLMs that ``supports_varlen``; None for flash-attention-2, whose varlen path
        reads sample starts from the position ids; else a block-diagonal causal mask
        (B, 1, T, T), additive as HF expects a 4-D mask."""
        config = self.llm.config
        if supports_varlen(config):
            from mllm.engine.patches import sdpa_segment_masks
            sdpa_segment_masks()  # once; later calls return at once
            return segment_starts(position_ids)
        if getattr(config, '_attn_implementation', None) == 'flash_attention_2':
            return None
        segment = (position_ids == 0).cumsum(-1)  # (B, T): sample number within the row
        same = segment.unsqueeze(-1) == segment.unsqueeze(-2)  # (B, T, T)
        allowed = same & torch.ones_like(same[0]).tril()  # causal inside each sample
        mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                 boxes: Optional[Sequence[torch.Tensor]] = None,
                 **generate_kwargs) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens); batches must be left-padded."""
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, boxes=boxes)
        generate_kwargs.setdefault('do_sample', False)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, **generate_kwargs)
