"""Runner hooks."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mllm.registry import HOOKS


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class TrainableCheckpointHook(Hook):
    """Checkpoints hold only what trains; frozen weights come from the pretrained parts.

    Saving drops every tensor whose parameter is frozen (a projector-only pretrain
    checkpoint is megabytes, not the whole LLM). Loading fills the absent frozen tensors
    from the freshly built model, so resuming and ``load_from`` see a complete state dict
    and only genuinely unexpected or missing keys are reported.
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = _unwrap(runner.model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = checkpoint['state_dict']
        kept = {k: v for k, v in state.items() if k in trainable}
        saved_mb = sum(v.numel() * v.element_size() for v in kept.values()) / 2**20
        runner.logger.info(f'checkpoint keeps the {len(kept)} trainable of {len(state)} tensors '
                           f'({saved_mb:.1f} MB); frozen weights come from the pretrained parts')
        checkpoint['state_dict'] = kept
        checkpoint.setdefault('meta', {})['trainable_only'] = True

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('state_dict')
        if state is None or not checkpoint.get('meta', {}).get('trainable_only'):
            return
        for key, value in _unwrap(runner.model).state_dict().items():
            state.setdefault(key, value)
