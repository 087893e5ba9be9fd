"""Loading HF checkpoints without network access, with errors that say what to do."""
import os


def from_pretrained_locally(model_cls, name_or_path: str, what: str, **kwargs):
    """``model_cls.from_pretrained`` from a local folder or the local HF cache only.

    Nothing is downloaded at run time; a missing checkpoint is a clear error instead of a
    network time-out hours into a job.
    """
    try:
        return model_cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        hint = ('' if os.path.isdir(name_or_path) else
                ' It is neither a local folder nor in the local Hugging Face cache; download it '
                'beforehand or point the config at a local folder.')
        raise FileNotFoundError(
            f'Cannot load the {what} from {name_or_path!r}.{hint} ({err})') from err
