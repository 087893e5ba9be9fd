"""What every mllm remote-code model shares, written next to the weights with its modeling
file (``mllm convert pth-to-hf ... --format remote_code``): a vision part (``image_features``)
whose tokens replace the ``config.image_token_index`` positions of the prompt, and a causal
LLM (``self.llm``) that runs on the merged embeddings. Needs torch and transformers; never
mllm.
"""
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel
from transformers.generation import GenerationMixin


class MllmForCausalLMBase(PreTrainedModel, GenerationMixin):
    """Subclasses build ``vision_encoder``, ``projector`` and ``llm``, define
    ``image_features(pixel_values, **image_inputs)`` -> (number of image tokens, C_llm) in
    prompt order, and a ``forward`` that names its extra image inputs (``bboxes``,
    ``image_sizes``): ``generate`` passes only the inputs ``forward`` names."""
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def embed_inputs(self, input_ids, pixel_values=None, **image_inputs) -> torch.Tensor:
        """Token embeddings with the image features scattered into the image positions;
        without ``pixel_values`` (generate's later steps) the text embeddings alone."""
        image_mask = input_ids == self.config.image_token_index  # (B, T)
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            return inputs_embeds
        feats = self.image_features(pixel_values, **image_inputs)
        if feats.shape[0] != int(image_mask.sum()):
            raise ValueError(f'image features and image tokens do not match: tokens '
                             f'{int(image_mask.sum())}, features {feats.shape[0]}')
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1),
                                            feats.to(inputs_embeds.dtype))

    def forward_llm(self, input_ids, pixel_values, inputs_embeds, image_inputs: dict, kwargs):
        """The LLM's forward on the merged embeddings; every other argument (attention mask,
        cache, labels, ...) goes to it as is."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, **image_inputs)
        return self.llm(inputs_embeds=inputs_embeds, **kwargs)


class CLIPTower(nn.Module):
    """CLIP ViT patch features (CLS dropped) of hidden layer ``select_layer``."""

    def __init__(self, clip_config: dict, select_layer: int):
        super().__init__()
        self.model = CLIPVisionModel(CLIPVisionConfig(**clip_config))
        self.select_layer = select_layer

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def forward(self, pixel_values):
        image_size = self.model.config.image_size
        pixels = pixel_values.to(self.model.dtype)
        # other input sizes (slices) interpolate the position embedding (bicubic)
        out = self.model(pixels, output_hidden_states=True,
                         interpolate_pos_encoding=tuple(pixels.shape[-2:]) != (image_size,) * 2)
        return out.hidden_states[self.select_layer][:, 1:]
