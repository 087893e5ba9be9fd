"""Per-sample checks of a training dataset as training reads it (``mllm check-data``,
``mllm sweep``'s pre-flight)."""
import json


def duplicate_ids(samples):
    """Yield (index, index of the first sample with the same id) for each repeated id."""
    from mllm.datasets.llava import sample_id

    first = {}
    for index, sample in enumerate(samples):
        sid = sample_id(sample)
        if sid is not None:
            key = json.dumps(sid, sort_keys=True)  # ids may be numbers or even objects
            if key in first:
                yield index, first[key]
            else:
                first[key] = index


def sample_problems(dataset):
    """Yield (index, problem) for every sample; structure first, then image and encoding."""
    from mllm.datasets.llava import DataError
    from mllm.datasets.templates import IMAGE_TOKEN_INDEX, encode_conversation

    structural = dict(dataset.problems)
    for index, sample in enumerate(dataset.samples):
        if index in structural:
            yield index, structural[index]
            continue
        num_image_tokens = 0
        if sample.get('image'):
            try:
                image = dataset.load_image(index)
                num_image_tokens = dataset.image_processor.num_visual_tokens(image.size)
                if dataset.box_entries is not None:
                    num_image_tokens += len(dataset.image_boxes(index, image.size))
            except DataError as err:
                yield index, str(err).removeprefix(dataset.describe(index) + ': ')
                continue
            if dataset.box_entries is not None:
                from mllm.datasets.boxes import box_problems
                for problem in box_problems(dataset.box_entry(index), *image.size):
                    yield index, f'box file {dataset.box_file}: {problem}'

        try:
            encoded = encode_conversation(sample['conversations'], dataset.tokenizer,
                                          dataset.template, num_image_tokens=num_image_tokens)
        except ValueError as err:
            yield index, str(err)
            continue
        ids = encoded['input_ids']
        if len(ids) > dataset.max_length:
            cut_image = IMAGE_TOKEN_INDEX in ids[dataset.max_length:]
            yield index, (f'{len(ids)} tokens exceed max_length {dataset.max_length}: ' +
                          ('truncation would cut its image tokens, so training stops on it'
                           if cut_image else 'training truncates it'))
