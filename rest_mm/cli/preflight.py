"""Checks ``tools/train.py``, ``tools/test.py`` and the other tools make before any work:
dataset paths, checkpoint paths, finite whole-model weights, the config's library, a
checkpoint to resume from, and the rule that no tool writes over what it reads. Each
failure is an exception whose message says what is wrong and what to do.
"""
import fnmatch
import os
import os.path as osp
from pathlib import Path
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from mmengine.config import Config

from rest_mm.cli.checkpoint_checks import RUNNER_WRAPPER_KEYS
from rest_mm.cli.dataset_checks import check_dataset_contents
from rest_mm.weights import check_finite, unwrap_checkpoint

_TOY_DATA_HINT = 'generate it with `python tools/make_toy_data.py` (or `make demo`)'
_DATA_HINTS = {
    'mmdet': ('download COCO 2017 (https://cocodataset.org) into data/coco/ as described in '
              "mmdet's docs (user_guides/dataset_prepare.md)"),
    'mmseg': ('download ADEChallengeData2016 into data/ade/ as described in '
              "mmseg's docs (user_guides/2_dataset_prepare.md)"),
}


# ---------------------------------------------------------------------------------------
# Clear errors for missing inputs.
# ---------------------------------------------------------------------------------------
def _dataset_configs(dataset) -> Iterator[dict]:
    """Leaf dataset configs under wrappers (RepeatDataset, ConcatDataset, ...)."""
    if not isinstance(dataset, dict):
        return
    if 'dataset' in dataset:
        yield from _dataset_configs(dataset['dataset'])
    elif 'datasets' in dataset:
        for inner in dataset['datasets']:
            yield from _dataset_configs(inner)
    else:
        yield dataset


def _dataset_paths(dataset: dict) -> Iterator[str]:
    data_root = dataset.get('data_root') or ''
    candidates = [dataset.get('ann_file') or '']
    prefix = dataset.get('data_prefix') or {}
    candidates += [v for v in prefix.values() if isinstance(v, str)]
    for path in candidates:
        if not path or '://' in path or '://' in data_root:
            continue
        yield path if osp.isabs(path) else osp.join(data_root, path)


def _dataloader_paths(cfg: Config, dataloaders: Iterable[str]) -> Iterator[Tuple[str, dict, str]]:
    """``(dataloader key, dataset config, path)`` for every annotation file and image folder
    of the given dataloaders' datasets; absent or ``None`` dataloaders are skipped."""
    for key in dataloaders:
        loader = cfg.get(key)
        if not loader:
            continue
        for dataset in _dataset_configs(loader.get('dataset')):
            for path in _dataset_paths(dataset):
                yield key, dataset, path


def check_datasets(cfg: Config, dataloaders: Iterable[str]) -> None:
    """Raise ``FileNotFoundError`` naming the first dataset path that does not exist, then
    check what the datasets hold (:func:`~rest_mm.cli.dataset_checks.check_dataset_contents`,
    which raises ``DatasetError``, a ``ValueError``).

    Args:
        cfg (Config): The run's config.
        dataloaders (Iterable[str]): Keys such as ``'train_dataloader'`` to check;
            absent or ``None`` entries are skipped.
    """
    scope = cfg.get('default_scope')
    dataloaders = list(dataloaders)
    for key, dataset, path in _dataloader_paths(cfg, dataloaders):
        if osp.exists(path):
            continue
        toy = 'toy' in path or 'toy' in osp.basename(cfg.filename or '')
        hint = _TOY_DATA_HINT if toy else _DATA_HINTS.get(scope, 'prepare the dataset')
        raise FileNotFoundError(
            f'{key}: dataset path {path!r} does not exist (data_root='
            f'{dataset.get("data_root")!r}, type={dataset.get("type")!r}); '
            f'{hint}, or point the config at your copy with '
            f'--cfg-options {key}.dataset.data_root=PATH')
    check_dataset_contents(scope, ((key, dataset) for key in dataloaders if cfg.get(key)
                                   for dataset in _dataset_configs(cfg[key].get('dataset'))))


def check_checkpoint(path: Optional[str], what: str = 'checkpoint') -> None:
    """Raise ``FileNotFoundError`` if a local checkpoint path does not exist."""
    if path is None or '://' in path:
        return
    if osp.isdir(path):
        raise FileNotFoundError(f'{what} {path!r} is a directory, not a file; pass the .pth '
                                f'file inside it (written by tools/train.py)')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} {path!r} does not exist; pass the path of a '
                                f'.pth file written by tools/train.py')


def check_scope(cfg: Config, config_path: str) -> str:
    """The config's ``default_scope``, which must name a library we support."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise ValueError(f'{config_path}: default_scope is {scope!r}; the tools run mmdet '
                         f"and mmseg configs, which set default_scope='mmdet' or 'mmseg' "
                         f"(inherit from an mmdet::/mmseg:: base config)")
    return scope


# ---------------------------------------------------------------------------------------
# Nothing an output is written to may be an input.
# ---------------------------------------------------------------------------------------
def _resolved(path: str) -> Path:
    # realpath, not Path.resolve, which raises RuntimeError on a symbolic link loop (whose
    # reader then names it)
    return Path(os.path.realpath(os.path.expanduser(path)))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # two names for one file (a hard link, or a case-insensitive file system)
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_output_over_inputs(output: Optional[str], inputs: Mapping[str, Optional[str]],
                              option: str, written: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` when writing ``output`` could overwrite or mix with an input.

    Refused: the output is an input (after resolving ``..`` and symbolic links, or the
    same file under another name); the output lies inside an input folder (what the tool
    writes would be mixed with, and later read as, what it reads); a file the tool writes
    in an output folder (``written``) would be an input file.

    Args:
        output (str, optional): The file or folder the tool writes; None: nothing.
        inputs (Mapping[str, str]): What the tool reads, as ``{description: path}``,
            files or folders. None and URLs are skipped.
        option (str): How the user named the output (e.g. ``'--out-dir'``), for the
            message.
        written (Sequence[str]): For a folder output, glob patterns of the names of the
            files the tool writes directly in it (e.g. ``'epoch_*.pth'``). Defaults to
            none.
    """
    if output is None:
        return
    target = _resolved(output)
    for what, path in inputs.items():
        if path is None or '://' in str(path):
            continue
        source = _resolved(str(path))
        problem = None
        if _same(target, source):
            problem = 'is'
        elif source.is_dir() and source in target.parents:
            problem = 'is inside'
        elif source.parent == target and any(fnmatch.fnmatchcase(source.name, pattern)
                                             for pattern in written):
            problem = f'would write {source.name} into the folder of'
        if problem:
            raise ValueError(f'{option} {output}: the output {problem} the {what} ({path}), '
                             f'which would be overwritten or mixed with what is written; '
                             f'choose an output outside the inputs')


def dataset_inputs(cfg: Config, dataloaders: Iterable[str]) -> Dict[str, str]:
    """The annotation files and image folders of the configs' datasets, as inputs for
    :func:`refuse_output_over_inputs`."""
    return {f'{key} data {path}': path for key, _, path in _dataloader_paths(cfg, dataloaders)}


def check_checkpoint_finite(checkpoint: Mapping, path: str) -> None:
    """Refuse a whole-model checkpoint whose weights hold NaN or Inf, naming the tensors
    (``--allow-non-finite`` of train and test loads it anyway).

    Raises:
        RuntimeError: From :func:`~rest_mm.weights.check_finite`.
    """
    check_finite(unwrap_checkpoint(checkpoint, wrappers=RUNNER_WRAPPER_KEYS), path,
                 opt_out='--allow-non-finite')


def check_resumable(checkpoint: Mapping, path: str) -> None:
    """Raise ``ValueError`` unless ``checkpoint`` is a training checkpoint that mmengine's
    Runner can resume (it reads these entries without checking for them)."""
    meta = checkpoint.get('meta')
    missing = [name for name, present in (
        ('meta.epoch', isinstance(meta, Mapping) and 'epoch' in meta),
        ('meta.iter', isinstance(meta, Mapping) and 'iter' in meta),
        ('state_dict', 'state_dict' in checkpoint),
        ('message_hub', 'message_hub' in checkpoint),
        ('optimizer', 'optimizer' in checkpoint)) if not present]
    if missing:
        raise ValueError(
            f'--resume {path}: not a training checkpoint written by tools/train.py (it has no '
            f'{", ".join(missing)}; its entries: {", ".join(map(str, list(checkpoint)[:6]))}). '
            f'To start a new training from its weights, pass them as --cfg-options '
            f'load_from={path} (a whole detector/segmentor) or '
            f'model.backbone.init_cfg.checkpoint={path} (backbone weights)')
