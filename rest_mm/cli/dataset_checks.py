"""What a dataset holds, checked before ``tools/train.py`` or ``tools/test.py`` builds anything:
mmdet and mmseg find these faults late (an epoch in), or never (objects dropped, pixels left
out of the mIoU without a word).

* COCO-style detection (mmdet's ``CocoDataset`` and the subclasses that read its format):
  every image the annotation file names exists, and decodes; the config's class names are
  the file's category names (missing ones named, with the nearest name of the file), in the
  file's order, each once; every annotation's category is one of the file's; a training set
  keeps at least one image after its ``filter_cfg``.
* Segmentation (mmseg's ``BaseSegDataset`` and the subclasses that read its layout): every
  image has its label map; label maps hold one channel, the size of their image, and values
  that are classes or the ignore index once ``reduce_zero_label`` and the classes' label map
  are applied, as mmseg's ``LoadAnnotations`` applies them.

The dataset's class is built with ``lazy_init=True`` (its paths, defaults, metainfo and label
map, nothing loaded); a COCO annotation file is then read with :mod:`json` alone (mmdet's
``load_data_list`` would also index it with pycocotools and parse every annotation), and file
existence is checked for every image; decoding is limited to :data:`DECODE_SAMPLE` images
(and label maps) per dataset, spread over the set, and the log says when a set was sampled.
Datasets of other formats, and remote files, are left to the library.
"""
import difflib
import functools
import json
import os
import os.path as osp
import sys
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.logging import print_log
from mmengine.registry import DATASETS
from PIL import Image, UnidentifiedImageError

DECODE_SAMPLE = 100  # images (and label maps) decoded per dataset, at most
_LISTED = 5  # names a message lists before "and N more"
# EXIF orientations that turn the picture by 90 degrees: mmcv decodes images upright (cv2 and
# its pillow backend both apply the tag), and label maps as stored.
_TRANSPOSED = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset whose contents would fail or mislead a run; the message names each fault."""


def check_dataset_contents(scope: Optional[str], datasets: Iterable[Tuple[str, dict]]) -> None:
    """Check the contents of the given datasets, logging one line for each checked.

    Args:
        scope (str, optional): The config's ``default_scope``, which resolves dataset types.
        datasets (Iterable[tuple]): ``(dataloader key, leaf dataset config)`` pairs, the
            dataset paths already known to exist.

    Raises:
        DatasetError: Naming every fault found, dataset by dataset.
    """
    problems = []
    for key, dataset in datasets:
        check = _checker(scope, dataset.get('type'))
        if check is None:
            continue
        found, summary = check(dataset)
        problems += [f'{key}: {problem}' for problem in found]
        if summary and not found:
            print_log(f'{key}: {summary}', logger='current')
    if problems:
        raise DatasetError('; '.join(problems))


# ---------------------------------------------------------------------------------------
# Dataset types.
# ---------------------------------------------------------------------------------------
def _checker(scope: Optional[str], dataset_type) -> Optional[Callable]:
    """The check for datasets of ``dataset_type`` (a name or class), or None where its
    format is not one checked here (or the type is unknown: the Runner will say so)."""
    cls = dataset_type
    if not isinstance(cls, type):
        try:
            with DATASETS.switch_scope_and_registry(scope) as registry:
                cls = registry.get(dataset_type)
        except (ImportError, KeyError, TypeError):
            return None
    if not isinstance(cls, type):
        return None
    # Subclasses that read another format (LVIS, panoptic, ...) override these readers.
    coco, segmentation = _coco_dataset(), _library_class('mmseg.datasets', 'BaseSegDataset')
    if (coco is not None and issubclass(cls, coco) and cls.load_data_list is coco.load_data_list
            and cls.parse_data_info is coco.parse_data_info):
        return functools.partial(_check_coco, cls)
    if (segmentation is not None and issubclass(cls, segmentation)
            and cls.load_data_list is segmentation.load_data_list):
        return functools.partial(_check_segmentation, cls)
    return None


def _library_class(module: str, name: str) -> Optional[type]:
    """A library's class if its module is imported, else None: a dataset class derived
    from it would have imported it (and importing mmdet's datasets costs seconds)."""
    return getattr(sys.modules.get(module), name, None)


def _coco_dataset() -> Optional[type]:
    return _library_class('mmdet.datasets', 'CocoDataset')


def _unloaded(cls: type, dataset: dict):
    """The dataset as its class builds it (the class's defaults and metainfo, paths joined
    to ``data_root``), without loading its annotations or building its pipeline (the keys
    left out: those mmengine's ``build_from_cfg`` takes, and what would load or build)."""
    return cls(**{key: value for key, value in dataset.items()
                  if key not in ('type', '_scope_', 'pipeline', 'lazy_init')}, lazy_init=True)


def _remote(*paths: Optional[str]) -> bool:
    return any(path and '://' in path for path in paths)


def _listed(names: Sequence, how=str) -> str:
    shown = ', '.join(how(name) for name in names[:_LISTED])
    return shown + (f' and {len(names) - _LISTED} more' if len(names) > _LISTED else '')


def _sample(items: Sequence) -> list:
    """At most DECODE_SAMPLE items, evenly spread over ``items`` (deterministic)."""
    if len(items) <= DECODE_SAMPLE:
        return list(items)
    return [items[i * len(items) // DECODE_SAMPLE] for i in range(DECODE_SAMPLE)]


def _decoded(count: int, total: int, what: str) -> str:
    if count == total:
        return f'decoded all {total} {what}'
    return f'decoded a sample of {count} of {total} {what}'


def _missing(paths: Sequence[str]) -> List[str]:
    """The paths that are not files; each folder is listed once instead of asking the file
    system for every path (COCO's 118k images), and what a listing lacks is asked for by
    name (a case-insensitive file system finds it)."""
    listings: Dict[str, set] = {}
    missing = []
    for path in paths:
        folder, name = osp.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or '.'))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder] and not osp.isfile(path):
            missing.append(path)
    return missing


def _open_image(path: str) -> Tuple[Optional[Image.Image], str]:
    """The decoded image, or None and why it is unreadable."""
    try:
        image = Image.open(path)
        image.load()
        return image, ''
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        return None, str(error) or type(error).__name__


def _upright_size(image: Image.Image) -> Tuple[int, int]:
    """(width, height) of ``image`` as mmcv decodes it, upright."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
        return height, width
    return width, height


# ---------------------------------------------------------------------------------------
# COCO-style detection.
# ---------------------------------------------------------------------------------------
def _read_coco(path: str) -> Tuple[Optional[dict], str]:
    try:
        with open(path, encoding='utf-8') as f:
            coco = json.load(f)
    except (OSError, ValueError) as error:
        return None, f'{path} is no readable JSON file ({error})'
    if not isinstance(coco, dict):
        return None, f'{path} holds no COCO annotations (a JSON object with images, categories)'
    for part in ('images', 'categories'):
        if not isinstance(coco.get(part), list):
            return None, f'{path} holds no COCO annotations: it has no {part!r} list'
    return coco, ''


def _class_problems(ann_file: str, classes: Sequence[str], categories: List[dict],
                    annotations: List[dict]) -> List[str]:
    """The config's classes against the file's categories, as mmdet matches them (by name,
    labels numbered in the file's order)."""
    names = [category.get('name') for category in categories]
    problems = []
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        problems.append(f'{ann_file} names the categories {_listed(twice, repr)} more than '
                        f'once (mmdet would give each of them several labels)')
    known_ids = {category.get('id') for category in categories}
    foreign = Counter(ann.get('category_id') for ann in annotations
                      if ann.get('category_id') not in known_ids)
    if foreign:
        problems.append(
            f'{sum(foreign.values())} annotations of {ann_file} have category ids '
            f'{_listed(sorted(foreign, key=str))} that none of its categories has (its '
            f'category ids: {_listed(sorted(known_ids, key=str))}); mmdet would drop them')
    missing = [name for name in classes if name not in names]
    extra = [name for name in names if name not in classes]
    if missing:
        def with_nearest(name):
            nearest = difflib.get_close_matches(str(name), [str(e) for e in extra], n=1)
            return repr(name) + (f' (did you mean {nearest[0]!r}?)' if nearest else '')
        problems.append(
            f"the config's classes {_listed(missing, with_nearest)} are no categories of "
            f'{ann_file}' + (f'; its categories not in the config: {_listed(extra, repr)}'
                             if extra else '') +
            '. Make metainfo.classes the names of the categories to train on')
    elif [name for name in names if name in classes] != list(classes) and not twice:
        problems.append(
            f"the config's classes are {ann_file}'s categories in another order; mmdet "
            f'numbers the labels in the file\'s order, so every label would carry another '
            f'class\'s name. List metainfo.classes in the file\'s order: '
            f'{tuple(name for name in names if name in classes)}')
    if extra and not missing:
        ids = {category.get('id') for category in categories if category.get('name') in extra}
        dropped = sum(ann.get('category_id') in ids for ann in annotations)
        if dropped:
            print_log(f'{ann_file}: {dropped} objects of the categories {_listed(extra, repr)}, '
                      f"which are not among the config's classes, are left out", logger='current',
                      level=30)
    return problems


def _kept_images(filter_cfg: Optional[dict], images: List[dict], annotations: List[dict],
                 class_ids: set) -> Tuple[int, str]:
    """How many images a training set keeps after its ``filter_cfg`` (mmdet's rule), and
    which filter removed them all."""
    filter_cfg = filter_cfg or {}
    filter_empty = filter_cfg.get('filter_empty_gt', False)
    min_size = filter_cfg.get('min_size', 0)
    annotated = {ann.get('image_id') for ann in annotations if ann.get('category_id') in class_ids}
    if filter_empty:
        images = [image for image in images if image.get('id') in annotated]
        if not images:
            return 0, ("it has no annotation of the config's classes, and filter_cfg."
                       'filter_empty_gt=True leaves out images without one')
    kept = [image for image in images
            if min(image.get('width', 0), image.get('height', 0)) >= min_size]
    return len(kept), (f'all its images are smaller than filter_cfg.min_size={min_size}'
                       if not kept else '')


def _check_coco(cls: type, dataset: dict) -> Tuple[List[str], str]:
    detection = _unloaded(cls, dataset)
    ann_file, img_dir = detection.ann_file, detection.data_prefix.get('img', '')
    if not ann_file or _remote(ann_file, img_dir) or not osp.isfile(ann_file):
        return [], ''
    coco, problem = _read_coco(ann_file)
    if coco is None:
        return [problem], ''
    images = coco['images']
    annotations = coco.get('annotations') or []
    if not images:
        return [f'{ann_file} lists no images (nothing to train or test on)'], ''
    nameless = [image for image in images if 'file_name' not in image or 'id' not in image]
    if nameless:
        return [f'{len(nameless)} images of {ann_file} have no file_name or id'], ''

    classes = detection.metainfo.get('classes')
    problems = []
    if classes is not None:
        problems += _class_problems(ann_file, list(classes), coco['categories'], annotations)
        class_ids = {category.get('id') for category in coco['categories']
                     if category.get('name') in classes}
        # mmdet filters a training set (not a test set) by CocoDataset.filter_data's rule.
        if (not problems and not detection.test_mode
                and cls.filter_data is _coco_dataset().filter_data):
            kept, why = _kept_images(detection.filter_cfg, images, annotations, class_ids)
            if not kept:
                problems.append(f'the training set {ann_file} keeps no image: {why}')

    paths = [osp.join(img_dir, image['file_name']) for image in images]
    missing = _missing(paths)
    if missing:
        problems.append(f'{len(missing)} of the {len(paths)} images {ann_file} names are '
                        f'missing under {img_dir or "."}: '
                        f'{_listed([osp.relpath(p, img_dir or ".") for p in missing])}')
    absent = set(missing)
    present = [path for path in paths if path not in absent]
    sample = _sample(present)
    unreadable = [(path, why) for path, why in ((p, _open_image(p)[1]) for p in sample) if why]
    if unreadable:
        problems.append(
            f'{len(unreadable)} images of {ann_file} cannot be decoded ('
            f'{_decoded(len(sample), len(present), "images")}): '
            f'{_listed(unreadable, lambda item: f"{item[0]} ({item[1]})")}')
    summary = (f'{len(paths)} images of {ann_file} present, '
               f'{_decoded(len(sample), len(paths), "images")}'
               + (f"; the config's {len(classes)} classes match its categories"
                  if classes is not None else ''))
    return problems, summary


# ---------------------------------------------------------------------------------------
# Segmentation: images and label maps.
# ---------------------------------------------------------------------------------------
def _value_ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 255]`` as ``'0-3, 255'``."""
    ranges, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            ranges.append(f'{start}' if start == value else f'{start}-{value}')
            start = None
    return ', '.join(ranges)


def _accepted_values(num_classes: int, ignore_index: int, reduce_zero_label: bool,
                     label_map: Optional[dict]) -> np.ndarray:
    """Which stored label values (0-255) become a class or the ignore index, through mmseg's
    ``LoadAnnotations``: ``reduce_zero_label`` (0 -> 255, v -> v - 1), then the label map."""
    lut = np.arange(256)
    if reduce_zero_label:
        lut = np.where((lut == 0) | (lut == 255), 255, lut - 1)
    if label_map:
        lut = np.array([label_map.get(int(v), int(v)) for v in lut])
    return (lut < num_classes) | (lut == ignore_index)


def _pair_faults(image_path: str, label_path: str, accepted: np.ndarray) -> Dict[str, str]:
    """The faults of one image and its label map, by kind."""
    image, why = _open_image(image_path)
    if image is None:
        return {'undecodable': f'{image_path} ({why})'}
    label_image, why = _open_image(label_path)
    if label_image is None:
        return {'undecodable': f'{label_path} ({why})'}
    label = np.asarray(label_image).squeeze()
    if label.ndim != 2:
        return {'channels': f'{label_path} (mode {label_image.mode})'}
    faults = {}
    size = _upright_size(image)
    if label_image.size != size:
        faults['size'] = (f'{label_path} is {label_image.size[0]}x{label_image.size[1]} but '
                          f'its image is {size[0]}x{size[1]}')
    bad = [int(v) for v in np.unique(label) if not 0 <= v <= 255 or not accepted[v]]
    if bad:
        faults['values'] = f'{label_path} holds {_listed(bad)}'
    return faults


def _check_segmentation(cls: type, dataset: dict) -> Tuple[List[str], str]:
    try:  # mmseg's BaseSegDataset makes its label map as it is built
        seg = _unloaded(cls, dataset)
    except (ValueError, AssertionError) as error:  # e.g. classes the dataset's own lack
        return [str(error)], ''
    img_dir, ann_dir = seg.data_prefix.get('img_path'), seg.data_prefix.get('seg_map_path')
    ann_file = seg.ann_file
    if img_dir is None or _remote(img_dir, ann_dir, ann_file):
        return [], ''
    listed = bool(ann_file) and osp.isfile(ann_file)
    # The images (and label maps) as mmseg's BaseSegDataset.load_data_list finds them.
    data_list = seg.load_data_list()
    if not data_list:
        where = f'{ann_file} lists' if listed else f'{img_dir} holds'
        return [f'{where} no images ending in {seg.img_suffix} (nothing to train or test '
                f'on)'], ''
    images = [info['img_path'] for info in data_list]
    problems = []
    missing = _missing(images) if listed else []
    if missing:
        problems.append(f'{len(missing)} of the {len(images)} images {ann_file} lists are '
                        f'missing: {_listed(missing)}')
    if ann_dir is None:  # no labels (prediction only)
        return problems, f'{len(images)} images under {img_dir}, no label maps'
    labels = [info['seg_map_path'] for info in data_list]
    no_label = _missing(labels)
    if no_label:
        problems.append(f'{len(no_label)} of the {len(images)} images under {img_dir} have no '
                        f'label map in {ann_dir} (ending in {seg.seg_map_suffix}): '
                        f'{_listed([osp.relpath(p, ann_dir) for p in no_label])}')

    classes = seg.metainfo.get('classes')
    if classes is None:
        return problems, ''
    label_map, ignore_index = seg.label_map, seg.ignore_index
    reduce_zero_label = seg.reduce_zero_label
    accepted = _accepted_values(len(classes), ignore_index, reduce_zero_label, label_map)
    unusable = set(missing) | set(no_label)
    pairs = _sample([(image, label) for image, label in zip(images, labels)
                     if image not in unusable and label not in unusable])
    faults: Dict[str, List[str]] = {}
    for image, label in pairs:
        for kind, fault in _pair_faults(image, label, accepted).items():
            faults.setdefault(kind, []).append(fault)
    checked = _decoded(len(pairs), len(images) - len(unusable), 'pairs')
    accepted_text = _value_ranges(np.flatnonzero(accepted).tolist())
    for kind, explained in (
            ('undecodable', 'files cannot be decoded'),
            ('channels', 'label maps hold several channels (one class index per pixel wanted)'),
            ('size', 'label maps differ in size (w x h) from their images'),
            ('values', f'label maps hold values that are no class: with {len(classes)} classes, '
                       f'ignore_index={ignore_index}, reduce_zero_label={reduce_zero_label}'
                       + (' and the label map of the classes' if label_map else '')
                       + f' the values accepted are {accepted_text}')):
        if kind in faults:
            problems.append(f'{len(faults[kind])} {explained} ({checked}): '
                            f'{_listed(faults[kind])}')
    summary = (f'{len(images)} images under {img_dir} with their label maps in {ann_dir}; '
               f'{checked}: sizes match, label values within the {len(classes)} classes '
               f'or ignore_index={ignore_index}')
    return problems, summary
