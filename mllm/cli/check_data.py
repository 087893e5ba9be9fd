"""``mllm check-data CONFIG``: validate every sample of the training data as training reads
it (structure, image present and decodable, template encoding, length) and report each
problem with its file and sample; exit 1 if there is any. Duplicate ids are warnings only.
``--show N`` prints the first N encoded samples; a progress bar runs on a terminal."""
import json
import sys

from mmengine.config import DictAction

from mllm.datasets.checks import duplicate_ids, sample_problems


def add_arguments(parser):
    parser.add_argument('config')
    parser.add_argument('--data', help="check this .json/.jsonl instead of the config's file")
    parser.add_argument('--image-folder', help="images of --data (default: the config's folder)")
    parser.add_argument('--show', type=int, default=0, metavar='N',
                        help='print the first N samples as training encodes them (every problem '
                        'is listed as well)')
    parser.add_argument('--json', action='store_true', help='one JSON object per line')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})


def run(args) -> int:
    from tqdm import tqdm

    from mllm.datasets.llava import DataError, sample_id
    from mllm.engine.config import load_config
    from mllm.registry import DATASETS

    cfg = load_config(args.config, args.cfg_options)
    dataset_cfg = cfg.train_dataloader.dataset.copy()
    if args.data:  # the config's image folder stays unless --image-folder names another
        dataset_cfg['data_path'] = args.data
    if args.image_folder:
        dataset_cfg['image_folder'] = args.image_folder
    dataset_cfg['strict'] = False
    try:
        dataset = DATASETS.build(dataset_cfg)
    except DataError as err:  # the whole file: invalid JSON or UTF-8, no samples
        if args.json:
            print(json.dumps(dict(file=dataset_cfg['data_path'], problem=str(err))))
        else:
            print(err, file=sys.stderr)
        return 1
    # a bar on a terminal only (tqdm's disable=None), on stderr so --json output stays clean
    checked = tqdm(sample_problems(dataset), total=len(dataset), desc='checking', unit=' samples',
                   file=sys.stderr, disable=None, leave=False)
    problems = list(checked)
    structural = {index for index, _ in dataset.problems}
    for index in range(min(args.show, len(dataset))):
        try:
            if index in structural:
                raise DataError('not a sample training can read')
            item = dataset[index]
        except DataError:  # it cannot be encoded; its problems are listed below
            if not args.json:
                print(f'{dataset.describe(index)}\n  not shown: see its problem below')
            continue
        record = dict(index=index, id=sample_id(dataset.samples[index]),
                      input_ids=item['input_ids'].tolist(), labels=item['labels'].tolist())
        print(json.dumps(record) if args.json else
              f'{dataset.describe(index)}\n  input_ids: {record["input_ids"]}\n'
              f'  labels:    {record["labels"]}')
    # a warning only: training does not need unique ids, but reports name samples by them
    duplicates = list(duplicate_ids(dataset.samples))
    for index, first in duplicates:
        sid, places = sample_id(dataset.samples[index]), dataset.places
        if args.json:
            print(json.dumps(dict(file=dataset.data_path, place=places[index], id=sid,
                                  warning=f'duplicate id, first at {places[first]}')))
        else:
            print(f'{dataset.data_path}: warning: duplicate id {sid!r} at {places[first]} and '
                  f'{places[index]}', file=sys.stderr)
    for index, problem in problems:
        if args.json:
            print(json.dumps(dict(file=dataset.data_path, place=dataset.places[index],
                                  id=sample_id(dataset.samples[index]), problem=problem)))
        else:
            print(f'{dataset.describe(index)}: {problem}', file=sys.stderr)
    summary = dict(file=dataset.data_path, samples=len(dataset), problems=len(problems))
    print(json.dumps(summary) if args.json else
          f'checked {len(dataset)} samples of {dataset.data_path}: {len(problems)} problem(s)'
          + (f', {len(duplicates)} duplicate id(s)' if duplicates else ''))
    return 1 if problems else 0
