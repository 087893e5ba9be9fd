"""Train a config with a plain PyTorch loop and score it on the synthetic set.

For machines that have torch and transformers but not the training stack (XTuner,
DeepSpeed: the lent GPU machine, see docs/performance.md), and for schedule searches: the
same model, dataset, collate, optimizer (with the config's ``paramwise_cfg``), learning-rate
schedule and gradient clipping as ``mllm train``, without the runner, its hooks or its
checkpoints. It is not a second trainer: ``mllm train`` remains the way to train, and the
claims it finds are held by tests that run ``mllm demo``.

    python tools/train_plain.py CONFIG --data-dir DIR --out RESULT.json \
        [--cfg-options k=v ...] [--deadline SECONDS] [--device cuda] [--seed N]

``--deadline`` stops training early, then scores what was trained (the result says how many
steps ran). The synthetic set must exist (``mllm.datasets.synthetic.generate_synthetic_vqa``).
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    parser.add_argument('--deadline', type=float, default=None, help='seconds of training')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-workers', type=int, default=2)
    parser.add_argument('--log-interval', type=int, default=100)
    args = parser.parse_args(argv)

    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    import mllm.datasets  # noqa: F401 - registers datasets and collate functions
    import mllm.models  # noqa: F401
    from mllm.cli.demo import synthetic_data_options
    from mllm.engine.config import load_config
    from mllm.evaluation.synthetic import score_model
    from mllm.registry import DATASETS, FUNCTIONS, MODELS

    name = os.path.splitext(os.path.basename(args.config))[0]
    options = synthetic_data_options(args.config, args.data_dir)
    options.update(args.cfg_options)
    cfg = load_config(args.config, options)
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model).to(args.device).train()
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    collate_cfg = dict(cfg.train_dataloader.collate_fn)
    collate = functools.partial(FUNCTIONS.get(collate_cfg.pop('type').split('.')[-1]),
                                **collate_cfg)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train_dataloader.batch_size, shuffle=True, drop_last=True,
        collate_fn=collate, num_workers=args.num_workers, generator=generator,
        persistent_workers=args.num_workers > 0)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optim_wrapper))
                  for s in cfg.param_scheduler]
    max_iters, interval = cfg.train_cfg.max_iters, args.log_interval
    step, losses, curve, start = 0, [], [], time.time()

    def done() -> bool:  # the deadline still lets one step run
        return step >= max_iters or (step > 0 and args.deadline is not None
                                     and time.time() - start >= args.deadline)

    while not done():
        for batch in loader:
            data = model.data_preprocessor(batch, True)
            loss = model(**data, mode='loss')['loss']
            optim_wrapper.update_params(loss)
            for scheduler in schedulers:
                scheduler.step()
            losses.append(loss.item())
            step += 1
            if step % interval == 0:
                curve.append(sum(losses[-interval:]) / interval)
                print(f'[{name}] step {step}/{max_iters} loss {curve[-1]:.4f} '
                      f'{(time.time() - start) / step:.3f} s/step', flush=True)
            if done():
                break
    train_seconds = time.time() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    scores = score_model(model.eval(), cfg, args.data_dir, False,
                         os.path.splitext(args.out)[0] + '.predictions.jsonl')
    custom_keys = (cfg.optim_wrapper.get('paramwise_cfg') or {}).get('custom_keys') or {}
    result = dict(config=args.config, seed=args.seed,
                  cfg_options={k: str(v) for k, v in args.cfg_options.items()},
                  lr_mults={k: v.get('lr_mult', 1.0) for k, v in custom_keys.items()},
                  steps=step, max_iters=max_iters, train_seconds=round(train_seconds, 1),
                  losses=curve, **scores)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
