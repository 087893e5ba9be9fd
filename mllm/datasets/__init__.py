"""Data: the LLaVA format, image processing, chat templates, collate, samplers, synthetic data."""
from mllm.datasets.collate import llava_collate
from mllm.datasets.image_processing import LLaVAImageProcessor
from mllm.datasets.llava import DataError, LLaVADataset
from mllm.datasets.slicing import UHDImageProcessor

__all__ = ['llava_collate', 'LLaVAImageProcessor', 'DataError', 'LLaVADataset',
           'UHDImageProcessor']
