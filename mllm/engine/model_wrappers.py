"""DDP that works on CPU (gloo) as well as on GPUs."""
import torch
from mmengine.model import MMDistributedDataParallel

from mllm.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUCompatibleDDP(MMDistributedDataParallel):
    """MMEngine's DDP wrapper; drops the ``device_ids`` the runner always passes when no
    CUDA device exists (torch's DDP rejects device ids for CPU modules)."""

    def __init__(self, module, device_ids=None, **kwargs):
        if not torch.cuda.is_available():
            device_ids = None
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=device_ids, **kwargs)
