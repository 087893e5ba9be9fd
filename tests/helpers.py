"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""
import glob
import json
import os

from mllm.engine.config import CONFIG_ROOT


def losses(work_dir):
    """Per-iteration losses from MMEngine's vis_data/scalars.json (newest run last)."""
    values = []
    for path in sorted(glob.glob(os.path.join(str(work_dir), '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            values += [json.loads(line)['loss'] for line in f if '"loss"' in line]
    return values


def swap_config(tmp_path, recipe, llm):
    """A backbone swap: a two-line file that inherits the recipe and an LLM base."""
    path = tmp_path / f'{recipe}_{llm}.py'
    path.write_text(f"_base_ = ['{CONFIG_ROOT}/_base_/recipes/{recipe}.py', "
                    f"'{CONFIG_ROOT}/_base_/llms/{llm}.py']\n")
    return str(path)
