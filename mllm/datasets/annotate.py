"""Open-vocabulary box annotation for MG-LLaVA's object tokens, with OWLv2 / OWL-ViT from
transformers, loaded from a local folder only.

MG-LLaVA tags each image with RAM++ and asks OWLv2 for boxes of those tags ("a photo of
{tag}", score > 0.2); NMS (per label, IoU 0.2) and the per-label cap (20 when > 100 boxes)
run later, in its dataset. RAM++ is not available here, so the label vocabulary comes from
the user, and NMS and the cap run here, once, so the box file holds what training uses.
"""
import json
import os
from typing import Dict, List, Sequence

import torch
from PIL import Image

from mllm.datasets.boxes import clip_boxes, filter_boxes

# config.json model_type -> (model class, processor class) in transformers
OWL_CLASSES = {
    'owlv2': ('Owlv2ForObjectDetection', 'Owlv2Processor'),
    'owlvit': ('OwlViTForObjectDetection', 'OwlViTProcessor'),
}


class AnnotateError(ValueError):
    """Bad input to the annotator (detector folder, labels, images); the message names it."""


def read_labels(labels: str = None, labels_file: str = None) -> List[str]:
    """The label vocabulary from ``--labels "cat,dog"`` or a file with one label per line:
    stripped, empty entries and duplicates dropped, order kept."""
    if labels_file is not None:
        try:
            with open(labels_file, encoding='utf-8') as f:
                raw = f.read().splitlines()
        except OSError as err:
            raise AnnotateError(f'{labels_file}: cannot read labels file ({err})') from None
        source = labels_file
    else:
        raw, source = (labels or '').split(','), '--labels'
    result = list(dict.fromkeys(label.strip() for label in raw if label.strip()))
    if not result:
        raise AnnotateError(f'{source}: no labels given')
    return result


def owl_model_type(detector: str) -> str:
    """``owlv2`` or ``owlvit`` from the folder's config.json; a clear error otherwise."""
    if not os.path.isdir(detector):
        raise AnnotateError(f'{detector}: detector folder not found (only local folders are '
                            f'used; save one with save_pretrained)')
    config_path = os.path.join(detector, 'config.json')
    try:
        with open(config_path, encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except FileNotFoundError:
        raise AnnotateError(f'{detector}: no config.json, not a transformers model '
                            f'folder') from None
    except (json.JSONDecodeError, AttributeError) as err:
        raise AnnotateError(f'{config_path}: unreadable config ({err})') from None
    if model_type not in OWL_CLASSES:
        raise AnnotateError(f'{detector}: model_type {model_type!r} is not an OWL detector '
                            f'(expected one of {sorted(OWL_CLASSES)})')
    return model_type


def preprocess(image_processor, image: Image.Image) -> torch.Tensor:
    """(3, S, S) input of an OWL image processor for one RGB image; a plain function so
    data-loader workers need only the processor, not the model."""
    return image_processor(image, return_tensors='pt')['pixel_values'][0]


class BoxAnnotator:
    """Boxes for a fixed label vocabulary, in original-image pixels.

    Args:
        detector: local folder of an OWLv2 or OWL-ViT model and its processor.
        labels: the label vocabulary; each is asked for as ``prompt.format(label)``.
        threshold: keep boxes whose best label score (sigmoid) is above this. Defaults to 0.1.
        nms_iou: per-label NMS IoU threshold. Defaults to 0.2 (MG-LLaVA).
        max_per_label: boxes kept per label when the cap applies. Defaults to 20.
        cap_above: the cap applies only to images with more boxes than this. Defaults to 100.
        prompt: text query; '{}' is replaced by the label. Defaults to 'a photo of {}'
            (MG-LLaVA's).
        device: torch device. Defaults to 'cpu'.
        dtype: model weights' dtype, e.g. torch.bfloat16 on a GPU. Defaults to float32.
    """

    def __init__(self, detector: str, labels: Sequence[str], threshold: float = 0.1,
                 nms_iou: float = 0.2, max_per_label: int = 20, cap_above: int = 100,
                 prompt: str = 'a photo of {}', device: str = 'cpu',
                 dtype: torch.dtype = torch.float32):
        import transformers

        if not labels:
            raise AnnotateError('no labels given')
        if '{}' not in prompt:
            raise AnnotateError(f'prompt {prompt!r} has no {{}} for the label')
        self.model_type = owl_model_type(detector)
        model_cls, processor_cls = (getattr(transformers, name)
                                    for name in OWL_CLASSES[self.model_type])
        try:
            self.processor = processor_cls.from_pretrained(detector, local_files_only=True)
            self.model = model_cls.from_pretrained(detector, local_files_only=True,
                                                   torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise AnnotateError(f'{detector}: cannot load the {self.model_type} detector '
                                f'and its processor ({err})') from None
        self.pixel_scale(1, 1)  # an unmappable processor fails here, not after the first batch
        side = self.model.config.vision_config.image_size
        size = self.processor.image_processor.size
        if (size.get('height'), size.get('width')) != (side, side):
            raise AnnotateError(f'{detector}: the processor makes {size} images but the model '
                                f'expects {side}x{side}')
        self.model.to(device).eval()
        self.device = device
        self.labels = list(labels)
        self.threshold, self.nms_iou = threshold, nms_iou
        self.max_per_label, self.cap_above = max_per_label, cap_above
        queries = [prompt.replace('{}', label) for label in self.labels]
        # OWL text towers have 16 positions: long prompts are cut, not rejected
        text = self.processor.tokenizer(queries, padding='max_length', truncation=True,
                                        return_tensors='pt')
        self.query_embeds = self._encode_queries(text['input_ids'].to(device),
                                                 text['attention_mask'].to(device))

    @torch.no_grad()
    def _encode_queries(self, input_ids, attention_mask) -> torch.Tensor:
        """(Q, D) text embeddings, computed once: the model's own forward would re-encode
        every query for every image of every batch."""
        base = getattr(self.model, self.model_type)  # .owlv2 / .owlvit
        embeds = base.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        if not isinstance(embeds, torch.Tensor):  # transformers 5: output, projected pooler
            embeds = embeds.pooler_output
        return embeds / torch.linalg.norm(embeds, dim=-1, keepdim=True)  # as the forward does

    @torch.no_grad()
    def _detect(self, pixel_values: torch.Tensor):
        """The detection forward with the cached queries: logits (B, P, Q) and normalised
        (cx, cy, w, h) boxes (B, P, 4) relative to the processed square image."""
        feature_map = self.model.image_embedder(pixel_values=pixel_values)[0]  # (B, h, w, C)
        image_feats = feature_map.flatten(1, 2)                                 # (B, P, C)
        queries = self.query_embeds.expand(len(pixel_values), -1, -1)           # (B, Q, D)
        logits = self.model.class_predictor(image_feats, queries)[0]
        return logits, self.model.box_predictor(image_feats, feature_map)

    def pixel_scale(self, width: int, height: int):
        """(sx, sy) from normalised box coordinates to original pixels. OWLv2 pads the image
        to a square at the bottom/right before resizing, so both axes are fractions of the
        longer side; OWL-ViT stretches the image to the model's square, so each axis is a
        fraction of its own side."""
        image_processor = self.processor.image_processor
        if getattr(image_processor, 'do_pad', False):
            side = max(width, height)
            return side, side
        if getattr(image_processor, 'do_center_crop', False):
            size, crop = image_processor.size, image_processor.crop_size
            if (size.get('height'), size.get('width')) != (crop.get('height'), crop.get('width')):
                raise AnnotateError(f'the detector processor resizes to {size} and crops to '
                                    f'{crop}: boxes cannot be mapped back to the original image')
        return width, height

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) model input for one RGB image (OWLv2: pad to square, then resize)."""
        return preprocess(self.processor.image_processor, image)

    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor, sizes: Sequence[tuple]) -> List[Dict[str, list]]:
        """One entry (``boxes``, ``labels``, ``scores``, best score first) per preprocessed
        image; ``sizes`` are the original (width, height)."""
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        logits, pred_boxes = self._detect(pixel_values)
        best = logits.float().max(dim=-1)
        scores, label_ids = best.values.sigmoid(), best.indices
        return [self._postprocess(pred_boxes[i].float().cpu(), scores[i].cpu(),
                                  label_ids[i].cpu(), width, height)
                for i, (width, height) in enumerate(sizes)]

    def __call__(self, images: List[Image.Image]) -> List[Dict[str, list]]:
        """``detect`` on RGB images."""
        return self.detect(torch.stack([self.preprocess(image) for image in images]),
                           [image.size for image in images])

    def _postprocess(self, boxes, scores, label_ids, width, height) -> Dict[str, list]:
        keep = scores > self.threshold
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
        cx, cy, w, h = boxes.unbind(-1)
        sx, sy = self.pixel_scale(width, height)
        xyxy = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy,
                            (cx + w / 2) * sx, (cy + h / 2) * sy], dim=-1)
        # 0.01 px is far below any feature grid; rounding before the area test keeps
        # every written box non-degenerate
        xyxy = torch.round(clip_boxes(xyxy.double(), width, height) * 100) / 100
        # a box entirely in OWLv2's padding has no area left: it shows nothing of the image
        inside = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        xyxy, scores, label_ids = xyxy[inside], scores[inside], label_ids[inside]
        labels = [self.labels[i] for i in label_ids.tolist()]
        order = filter_boxes(xyxy, scores, labels, self.nms_iou, self.max_per_label,
                             self.cap_above)
        return dict(boxes=[xyxy[i].tolist() for i in order.tolist()],
                    labels=[labels[i] for i in order.tolist()],
                    scores=[round(scores[i].item(), 4) for i in order.tolist()])
