"""Samplers. LLaVA's group-by-modality-length sampler is XTuner's, registered here."""
from mllm.engine import compat
from mllm.registry import DATA_SAMPLERS

compat.apply_all()  # before XTuner: it imports names transformers 5 removed
from xtuner.dataset.samplers import LengthGroupedSampler  # noqa: E402

# Groups samples of similar length (multimodal and text-only apart) into mega-batches,
# as LLaVA-1.5's finetuning does; reads the dataset's `modality_length` property.
DATA_SAMPLERS.register_module(name='LengthGroupedSampler', module=LengthGroupedSampler)
