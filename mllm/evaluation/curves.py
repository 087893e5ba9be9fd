"""Training curves from MMEngine's ``<work_dir>/<timestamp>/vis_data/scalars.json``
(``mllm plot``, ``mllm demo``, ``mllm sweep --report``).

A work dir holds one timestamp folder per launch. They are read oldest first: a resumed
launch continues the curve, and a launch that restarts at an earlier step replaces the
steps it repeats (a fresh re-run from step 1 replaces everything before it).
"""
import glob
import json
import os
from typing import Dict, List

# (scalars.json key, panel title)
PANELS = (('loss', 'loss'), ('lr', 'learning rate'), ('grad_norm', 'grad norm'),
          ('tokens_per_s', 'tokens / s'))



def read_run(work_dir: str) -> List[dict]:
    """Per-step records of a work dir, launches joined as described in the module doc."""
    paths = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not paths:
        raise FileNotFoundError(f'no training logs in {work_dir} (expected '
                                '<timestamp>/vis_data/scalars.json from `mllm train`)')
    records: List[dict] = []
    for path in paths:
        with open(path) as f:
            launch = [json.loads(line) for line in f if line.strip()]
        launch = [r for r in launch if 'step' in r]
        if launch:
            first = launch[0]['step']
            records = [r for r in records if r['step'] < first] + launch
    return records


def plot_runs(runs: Dict[str, List[dict]], out: str) -> List[str]:
    """Draw the panels that have data to ``out``; returns the panel keys drawn."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in PANELS
              if any(key in r for records in runs.values() for r in records)]
    if not panels:
        raise ValueError(f'none of {[k for k, _ in PANELS]} is in the logs')
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        for name, records in runs.items():
            points = [(r['step'], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.2)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc='upper right', fontsize='small')
    axes[-1, 0].set_xlabel('iteration')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [key for key, _ in panels]
