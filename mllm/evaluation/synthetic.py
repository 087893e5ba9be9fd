"""Scoring a model on the synthetic demo set (``mllm demo``, ``mllm sweep --eval synthetic:DIR``)."""
import json


def score_synthetic(cfg, checkpoint: str, data_dir: str, blank_images: bool,
                    predictions_path: str) -> dict:
    """Greedy answers of ``cfg``'s model at ``checkpoint`` to ``<data_dir>/val.json``: overall
    and per-category accuracy (also ``mllm sweep --eval synthetic:DIR``)."""
    from mllm.inference.inference import load_model

    return dict(score_model(load_model(cfg, checkpoint), cfg, data_dir, blank_images,
                            predictions_path), checkpoint=checkpoint)


def score_model(model, cfg, data_dir: str, blank_images: bool, predictions_path: str) -> dict:
    """``score_synthetic`` for a model already in memory (on any device)."""
    from mllm.datasets.synthetic import CATEGORIES, answer_matches
    from mllm.inference.inference import answer_questions
    from mllm.registry import DATASETS

    dataset_cfg = dict(cfg.train_dataloader.dataset, data_path=f'{data_dir}/val.json',
                       image_folder=f'{data_dir}/images', blank_images=blank_images)
    dataset = DATASETS.build(dataset_cfg)
    predictions = answer_questions(model, dataset)
    per_category = {c: [0, 0] for c in CATEGORIES}
    with open(predictions_path, 'w') as f:
        for sample, prediction in zip(dataset.samples, predictions):
            answer = sample['conversations'][-1]['value']
            correct = answer_matches(prediction, answer)
            per_category[sample['category']][0] += correct
            per_category[sample['category']][1] += 1
            f.write(json.dumps(dict(id=sample['id'], category=sample['category'], answer=answer,
                                    prediction=prediction, correct=correct)) + '\n')
    correct = sum(c for c, _ in per_category.values())
    return dict(accuracy=correct / len(dataset),
                per_category={c: round(k / n, 4) for c, (k, n) in per_category.items() if n})
