from mllm.models.convnext import ConvNeXtEncoder
from mllm.models.fusion import ConvGateFusion
from mllm.models.llava import LLaVAModel, set_trainable
from mllm.models.llms import HFCausalLM, build_tokenizer
from mllm.models.mgllava import MGLLaVAModel
from mllm.models.projectors import MLPProjector
from mllm.models.vision import CLIPVisionEncoder

__all__ = ['LLaVAModel', 'set_trainable', 'HFCausalLM', 'build_tokenizer', 'MLPProjector',
           'CLIPVisionEncoder', 'ConvNeXtEncoder', 'ConvGateFusion', 'MGLLaVAModel']
