"""Model inspection on the meta device (no weights, seconds even for 34B): parameters per
component, trainable parameters and visual tokens (``mllm inspect``, the memory planner)."""
from mllm.models.meta import build_on_meta

# model attribute -> reported component name
COMPONENT_NAMES = {'vision_encoder': 'vision', 'high_res_encoder': 'vision_high_res',
                   'projector': 'projector', 'llm': 'llm'}


def inspect_config(cfg, image_size=None) -> dict:
    """The report of ``mllm inspect`` for a loaded (bound) config."""
    from mllm.registry import TRANSFORMS

    model = build_on_meta(cfg)
    params = {}
    for name, child in model.named_children():
        # LoRA adapters are their own component so `llm` stays the published size
        counts = {}
        for pname, p in child.named_parameters():
            part = 'lora' if 'lora_' in pname else COMPONENT_NAMES.get(name, name)
            counts[part] = counts.get(part, 0) + p.numel()
        for part, count in counts.items():
            params[part] = params.get(part, 0) + count
    params['total'] = sum(p.numel() for p in model.parameters())
    processor = TRANSFORMS.build(cfg.image_processor)
    image_size = image_size or (processor.size, processor.size)
    # one image may become several tensors (UHD slices + overview), each its own tokens
    units = (processor.unit_sizes(image_size) if hasattr(processor, 'unit_sizes')
             else [processor.output_size(image_size)])
    report = dict(params=params,
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  visual_tokens=sum(model.num_visual_tokens(unit) for unit in units),
                  image_size=list(image_size))
    if hasattr(processor, 'layout'):
        report['slices'] = list(processor.layout(image_size)['grid'])  # [rows, cols]
    return report
