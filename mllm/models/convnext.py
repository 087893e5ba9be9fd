"""ConvNeXt vision encoder (ConvLLaVA, MG-LLaVA's high-resolution branch).

ConvLLaVA (seed 000; Ge et al. 2024, "ConvLLaVA: Hierarchical Backbones as Visual Encoder
for Large Multimodal Models") replaces the ViT with LAION's CLIP ConvNeXt-Large (depths
[3, 3, 27, 3], dims [192, 384, 768, 1536], stride 32) and appends a randomly initialised
5th stage (LayerNorm + Conv k2 s2 to 3072 channels, 6 ConvNeXt blocks), so a 1536-px image
gives (1536 / 64)^2 = 576 tokens. MG-LLaVA uses open_clip's ``convnext_large_d_320`` trunk
and needs every stage's map (``forward_stages``).

Three backends build the trunk; the encoder keeps only its ``stem`` and ``stages`` (no
pooling head), so parameter names read ``stem``, ``stages.0`` ... ``stages.3``,
``stage5`` and freezing prefixes such as ``vision_encoder.stages.2`` are obvious:

* ``'hf'``: transformers ``ConvNextModel`` (ConvLLaVA's checkpoints are in this format);
* ``'timm'``: any timm ConvNeXt variant (``convnext_atto`` ... ``convnext_xxlarge``);
* ``'open_clip'``: the image trunk of an open_clip CLIP-ConvNeXt (``convnext_large_d_320``).
"""
import contextlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm.hf_utils import from_pretrained_locally
from mllm.registry import MODELS

BACKENDS = ('hf', 'timm', 'open_clip')
# ConvLLaVA's LAION CLIP ConvNeXt-Large as a transformers ConvNextConfig
CONVNEXT_LARGE = dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536])


@contextlib.contextmanager
def meta_safe_build():
    """Build modules with meta parameters even where the constructor needs real tensors.

    Under ``with torch.device('meta')`` (``mllm inspect``) HF ``ConvNextModel`` and timm's
    ``ConvNeXt`` call ``torch.linspace(...).tolist()`` for drop-path rates, which fails on
    meta. Here the meta device mode is lifted while accelerate's ``init_empty_weights``
    turns every registered parameter into a meta tensor, so nothing big is allocated
    (one parameter at a time, then freed) and the constructor's small tensors are real.
    Outside the meta device this is a no-op.
    """
    if torch.get_default_device().type != 'meta':
        yield
        return
    from accelerate import init_empty_weights
    # NOTE: private torch API; pops the innermost mode, the DeviceContext of `torch.device`
    from torch.overrides import _pop_mode_temporarily
    with _pop_mode_temporarily(), init_empty_weights(include_buffers=False):
        yield


def _hf_trunk(pretrained: Optional[str], config: Optional[dict], load_weights: bool):
    """(stem, stages, ConvNextConfig) of a transformers ConvNext."""
    from transformers import ConvNextConfig, ConvNextModel
    if pretrained is not None and load_weights:
        # the final LayerNorm is not part of the trunk (never read); ConvLLaVA's 5-stage tower
        # saves it at the 4-stage width while its config says the 5th stage's, so it is let
        # through as mismatched, and nothing else is
        model, info = from_pretrained_locally(ConvNextModel, pretrained, 'ConvNeXt vision encoder',
                                              output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        outside = ('layernorm.', 'pooler.')
        missing = sorted(k for k in info.get('missing_keys', ()) if not k.startswith(outside))
        mismatched = sorted(k[0] if isinstance(k, tuple) else k
                            for k in info.get('mismatched_keys', ()))
        mismatched = [k for k in mismatched if not k.startswith(outside)]
        if missing or mismatched:
            raise ValueError(
                f'vision_encoder.pretrained={pretrained!r} does not hold this ConvNeXt: '
                f'{len(missing)} tensors missing ({", ".join(missing[:4])}), {len(mismatched)} '
                f'of another shape ({", ".join(mismatched[:4])}); they would start random')
        return model.embeddings, model.encoder.stages, model.config
    if config is not None:
        hf_config = ConvNextConfig(**config)
    elif pretrained is not None:
        hf_config = ConvNextConfig.from_pretrained(pretrained, local_files_only=True)
    else:
        raise ValueError("ConvNeXtEncoder(backend='hf') needs `pretrained` or `config`")
    model = ConvNextModel(hf_config)
    return model.embeddings, model.encoder.stages, hf_config


def _timm_trunk(model_name: str, pretrained: Optional[str], load_weights: bool, kwargs: dict):
    """(stem, stages) of a timm ConvNeXt; ``pretrained`` is a local weights file."""
    import timm

    from mllm.engine.patches import timm_weights_only
    timm_weights_only()  # timm would unpickle the file with weights_only=False
    load = pretrained is not None and load_weights
    # timm drops the classifier of a checkpoint when num_classes differs (here: no head)
    overlay = dict(pretrained_cfg_overlay=dict(file=pretrained)) if load else {}
    model = timm.create_model(model_name, pretrained=load, num_classes=0, **overlay, **kwargs)
    return model.stem, model.stages


def _open_clip_trunk(model_name: str, pretrained: Optional[str], load_weights: bool,
                     device: str):
    """(stem, stages) of an open_clip CLIP-ConvNeXt image trunk (a timm ConvNeXt)."""
    import open_clip
    # create_model ends with `.to(device)`; meta parameters can only go to 'meta'
    model = open_clip.create_model(model_name, pretrained=pretrained if load_weights else None,
                                   device=device)
    trunk = model.visual.trunk
    return trunk.stem, trunk.stages


def _extra_stage(backend: str, hf_config, in_channels: int, channels: int, depth: int,
                 conv_mlp: bool) -> nn.Module:
    """ConvLLaVA's 5th stage in the backend's own block type (so its checkpoints load)."""
    if backend == 'hf':
        from transformers.models.convnext.modeling_convnext import ConvNextStage
        return ConvNextStage(hf_config, in_channels, channels, kernel_size=2, stride=2,
                             depth=depth)
    from timm.models.convnext import ConvNeXtStage, _get_norm_layers
    norm_layer, norm_layer_cl = _get_norm_layers(None, conv_mlp, None)
    return ConvNeXtStage(in_channels, channels, kernel_size=7, stride=2, depth=depth,
                         ls_init_value=1e-6, conv_mlp=conv_mlp, norm_layer=norm_layer,
                         norm_layer_cl=norm_layer_cl)


def _init_weights(module: nn.Module) -> None:
    """timm's ConvNeXt init for new layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _stage_channels(backend: str, stages: nn.Module, hf_config) -> List[int]:
    if backend == 'hf':
        return list(hf_config.hidden_sizes)
    return [stage.blocks[-1].conv_dw.out_channels for stage in stages]


@MODELS.register_module()
class ConvNeXtEncoder(nn.Module):
    """Hierarchical ConvNeXt encoder: images (B, 3, H, W) -> tokens (B, N, C) of the last
    stage's map, N = ceil(W / stride) * ceil(H / stride).

    Args:
        backend: 'hf' (transformers ``ConvNextModel``), 'timm' or 'open_clip'.
            Defaults to 'hf'.
        pretrained: 'hf': HF id or local folder; 'timm' / 'open_clip': a local weights
            file. Defaults to None (random init).
        config: 'hf' only: ``ConvNextConfig`` fields, used when ``pretrained`` is None or
            ``load_weights`` is False. Defaults to ConvNeXt-Large when neither is given.
        model_name: 'timm' / 'open_clip' model name, e.g. 'convnext_atto' or
            'convnext_large_d_320'. Defaults to None.
        model_kwargs: extra timm ``create_model`` arguments (e.g. ``depths``, ``dims`` for a
            tiny test variant). Defaults to None.
        load_weights: load ``pretrained`` weights. Defaults to True.
        extra_stage: ConvLLaVA's 5th stage, ``dict(channels=3072, depth=6)``: downsample
            (LayerNorm + Conv k2 s2) and ``depth`` ConvNeXt blocks, random init; doubles the
            stride. Defaults to None.
    """

    def __init__(self,
                 backend: str = 'hf',
                 pretrained: Optional[str] = None,
                 config: Optional[dict] = None,
                 model_name: Optional[str] = None,
                 model_kwargs: Optional[dict] = None,
                 load_weights: bool = True,
                 extra_stage: Optional[dict] = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if backend != 'hf' and model_name is None:
            raise ValueError(f"ConvNeXtEncoder(backend={backend!r}) needs `model_name`")
        hf_config = None
        device = torch.get_default_device().type  # 'meta' under `mllm inspect`
        with meta_safe_build():
            loaded_stage5 = None
            if backend == 'hf':
                config = CONVNEXT_LARGE if config is None and pretrained is None else config
                self.stem, self.stages, hf_config = _hf_trunk(pretrained, config, load_weights)
                if len(self.stages) == 5:  # ConvLLaVA's released tower: stage 5 included
                    loaded_stage5, hf_config = self._split_stage5(hf_config, extra_stage,
                                                                  pretrained)
            elif backend == 'timm':
                self.stem, self.stages = _timm_trunk(model_name, pretrained, load_weights,
                                                     dict(model_kwargs or {}))
            else:
                self.stem, self.stages = _open_clip_trunk(model_name, pretrained, load_weights,
                                                          device)
            self.stage_channels = _stage_channels(backend, self.stages, hf_config)
            self.stage5 = None
            if loaded_stage5 is not None:
                self.stage5 = loaded_stage5
                self.stage_channels.append(extra_stage['channels'])
            elif extra_stage is not None:
                conv_mlp = backend != 'hf' and getattr(
                    self.stages[-1].blocks[-1], 'use_conv_mlp', False)
                self.stage5 = _extra_stage(backend, hf_config, self.stage_channels[-1],
                                           extra_stage['channels'], extra_stage['depth'],
                                           conv_mlp)
                self.stage5.apply(_init_weights)
                self.stage_channels.append(extra_stage['channels'])
        self.backend = backend
        self.grad_checkpointing = False
        self.loaded_pretrained = pretrained is not None and load_weights
        self.stage5_loaded = loaded_stage5 is not None
        # what rebuilds this architecture without the pretrained files (exported folders)
        self._weightless_cfg = dict(
            pretrained=None, load_weights=False,
            config=hf_config.to_dict() if hf_config is not None else None)

    def _split_stage5(self, hf_config, extra_stage: Optional[dict], pretrained: str):
        """A 5-stage ``ConvNextModel`` (ConvLLaVA's ``add_stage``): its 5th stage becomes
        ``stage5``, loaded, and must be the one ``extra_stage`` describes. Returns
        (stage 5, the 4-stage config that rebuilds the trunk)."""
        from transformers import ConvNextConfig
        channels, depth = hf_config.hidden_sizes[4], hf_config.depths[4]
        if extra_stage is None or (extra_stage['channels'], extra_stage['depth']) != (channels,
                                                                                      depth):
            raise ValueError(
                f'vision_encoder.pretrained={pretrained!r} is a 5-stage ConvNeXt (stage 5: '
                f'{channels} channels, depth {depth}); set vision_encoder.extra_stage='
                f'dict(channels={channels}, depth={depth}) (the config has {extra_stage})')
        stage5 = self.stages[4]
        self.stages = self.stages[:4]
        fields = {k: v for k, v in hf_config.to_dict().items()
                  if k not in ('stage_names', 'out_features', 'out_indices', 'num_stages')}
        fields.update(depths=list(hf_config.depths[:4]),
                      hidden_sizes=list(hf_config.hidden_sizes[:4]))
        return stage5, ConvNextConfig(**fields)

    def weight_origin(self, key: str) -> Optional[str]:
        """'pretrained' / 'config' for the trunk as built; None for a random 5th stage
        (``mllm.models.llava.weight_origin``)."""
        if key.startswith('stage5.') and not self.stage5_loaded:
            return None
        return 'pretrained' if self.loaded_pretrained else 'config'

    def weightless_cfg(self) -> dict:
        """Config overrides that build the same architecture without reading ``pretrained``
        (an exported folder stores the weights itself)."""
        return dict(self._weightless_cfg)

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    @property
    def stride(self) -> int:
        """Input pixels per output token along a side: 4 (stem), x2 per later stage."""
        return 4 * 2 ** (len(self.stage_channels) - 1)

    def num_visual_tokens(self, image_size: Tuple[int, int]) -> int:
        """Tokens for an input tensor of ``image_size`` = (W, H) pixels."""
        w, h = image_size
        return math.ceil(w / self.stride) * math.ceil(h / self.stride)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _all_stages(self) -> List[nn.Module]:
        return list(self.stages) + ([self.stage5] if self.stage5 is not None else [])

    def forward_stages(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """Every stage's map, (B, C_i, H / (4 * 2^i), W / (4 * 2^i)) for stage i."""
        dtype = next(self.stem.parameters()).dtype
        pixels = pixel_values.to(dtype)
        # pad right/bottom to a multiple of the stride so the token count is
        # ceil(W / stride) * ceil(H / stride), as num_visual_tokens says (0 = the mean colour)
        h, w = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -w % self.stride, 0, -h % self.stride))
        hidden = self.stem(pixels)  # (B, C_0, H / 4, W / 4)
        maps = []
        for stage in self._all_stages():
            if self.grad_checkpointing and self.training:
                hidden = checkpoint(stage, hidden, use_reentrant=False)
            else:
                hidden = stage(hidden)
            maps.append(hidden)
        return maps

    def forward(self, pixel_values: torch.Tensor, return_stages: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Tokens (B, N, C) of the last map; with ``return_stages`` also every stage's map."""
        maps = self.forward_stages(pixel_values)
        tokens = maps[-1].flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)
        return (tokens, maps) if return_stages else tokens
