"""A small synthetic dataset of shapes, for seeing the pipeline learn without COCO (the
toy configs name its classes; their palettes are theirs to choose).

Each image holds one to four non-overlapping shapes (rectangles, ellipses, triangles) on
a noisy background. Every shape is drawn from its polygon, and its instance mask, box and
semantic label come from the same polygon, so the annotations are exact. Each class also
has its own hue range: the task is meant to be learnable from scratch in minutes on a CPU,
and colour gives the model an easy first cue before it learns the outlines.

Two layouts are written from one list of scenes:

* ``toy_coco/{train,val}/*.jpg`` with ``toy_coco/annotations/instances_{train,val}.json``
  (COCO instance segmentation: polygons, boxes, areas; category ids from 1);
* ``toy_ade/images/{training,validation}/*.jpg`` with
  ``toy_ade/annotations/{training,validation}/*.png`` label maps (0 background, then
  the shape classes from 1, as :data:`SEG_CLASSES`).

Generation is deterministic: the same arguments always give byte-identical label files
and annotation JSONs. A ``toy_data.json`` manifest records the arguments, so
:func:`generate_toy_datasets` leaves up-to-date data alone and regenerates stale data.
"""
import json
import math
import os
import os.path as osp
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from rest_mm.cli.safe_files import atomic_open

CLASSES = ('rectangle', 'ellipse', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES
# Hue centres in degrees (red, green, blue) and how far a shape's hue may stray.
_CLASS_HUES = (0., 120., 240.)
_HUE_SPREAD = 30.
MANIFEST = 'toy_data.json'


@dataclass(frozen=True)
class ToyDataSpec:
    """What a toy dataset is made of; equal specs give identical data.

    Args:
        num_train (int): Training images.
        num_val (int): Validation images.
        height (int): Image height in pixels.
        width (int): Image width in pixels.
        min_size (int): Smallest shape side in pixels.
        max_size (int): Largest shape side in pixels.
        max_objects (int): Most shapes in one image (at least one).
        seed (int): Random seed.
    """
    num_train: int = 240
    num_val: int = 48
    height: int = 128
    width: int = 160
    min_size: int = 24
    max_size: int = 64
    max_objects: int = 4
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.num_train < 1 or self.num_val < 1:
            problems.append(f'num_train and num_val must be >= 1 (got {self.num_train}, '
                            f'{self.num_val})')
        if not 8 <= self.min_size <= self.max_size:
            problems.append(f'need 8 <= min_size <= max_size (got {self.min_size}, '
                            f'{self.max_size})')
        if self.max_size > min(self.height, self.width) - 4:
            problems.append(f'max_size {self.max_size} does not fit a '
                            f'{self.height}x{self.width} image with a 2-pixel border')
        if self.max_objects < 1:
            problems.append(f'max_objects must be >= 1 (got {self.max_objects})')
        if problems:
            raise ValueError('invalid toy data spec: ' + '; '.join(problems))


@dataclass
class Shape:
    label: int  # index into CLASSES
    polygon: List[Tuple[float, float]]
    color: Tuple[int, int, int]


def _hsv_to_rgb(hue: float, sat: float, val: float) -> Tuple[int, int, int]:
    hue = (hue % 360.) / 60.
    chroma = val * sat
    x = chroma * (1 - abs(hue % 2 - 1))
    r, g, b = [(chroma, x, 0), (x, chroma, 0), (0, chroma, x), (0, x, chroma),
               (x, 0, chroma), (chroma, 0, x)][int(hue) % 6]
    m = val - chroma
    return tuple(int(round(255 * (c + m))) for c in (r, g, b))


def _polygon(label: int, x0: float, y0: float, w: float, h: float,
             rng: np.random.RandomState) -> List[Tuple[float, float]]:
    x1, y1 = x0 + w, y0 + h
    if CLASSES[label] == 'rectangle':
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if CLASSES[label] == 'ellipse':
        cx, cy = x0 + w / 2, y0 + h / 2
        return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    apex_x = x0 + w * rng.uniform(0.25, 0.75)
    if rng.rand() < 0.5:  # pointing up or down
        return [(apex_x, y0), (x1, y1), (x0, y1)]
    return [(apex_x, y1), (x0, y0), (x1, y0)]


def _sample_scene(spec: ToyDataSpec, rng: np.random.RandomState) -> List[Shape]:
    shapes, boxes = [], []
    wanted = rng.randint(1, spec.max_objects + 1)
    for _ in range(50 * wanted):
        if len(shapes) == wanted:
            break
        w, h = rng.randint(spec.min_size, spec.max_size + 1, size=2)
        x0 = rng.randint(2, spec.width - w - 1)
        y0 = rng.randint(2, spec.height - h - 1)
        box = (x0 - 2, y0 - 2, x0 + w + 2, y0 + h + 2)  # keep shapes 4 pixels apart
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
               for b in boxes):
            continue
        label = rng.randint(len(CLASSES))
        hue = _CLASS_HUES[label] + rng.uniform(-_HUE_SPREAD, _HUE_SPREAD)
        color = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        shapes.append(Shape(label, _polygon(label, x0, y0, w, h, rng), color))
        boxes.append(box)
    return shapes


def _render(spec: ToyDataSpec, shapes: Sequence[Shape],
            rng: np.random.RandomState) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The RGB image and one boolean mask per shape."""
    grey = rng.randint(60, 180)
    background = grey + rng.normal(0, 12, size=(spec.height, spec.width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    masks = []
    for shape in shapes:
        draw.polygon(shape.polygon, fill=shape.color)
        mask = Image.new('L', (spec.width, spec.height), 0)
        ImageDraw.Draw(mask).polygon(shape.polygon, fill=1)
        masks.append(np.asarray(mask, dtype=bool))
    return np.asarray(image), masks


def _coco_annotation(shape: Shape, mask: np.ndarray, ann_id: int, image_id: int) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return dict(id=ann_id, image_id=image_id, category_id=shape.label + 1,
                bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                area=int(mask.sum()), iscrowd=0,
                segmentation=[[round(float(c), 2) for point in shape.polygon for c in point]])


def _write_split(spec: ToyDataSpec, num_images: int, rng: np.random.RandomState,
                 coco_root: str, coco_split: str, ade_root: str, ade_split: str) -> dict:
    for folder in (osp.join(coco_root, coco_split), osp.join(ade_root, 'images', ade_split),
                   osp.join(ade_root, 'annotations', ade_split)):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    images, annotations = [], []
    for index in range(num_images):
        shapes = _sample_scene(spec, rng)
        image, masks = _render(spec, shapes, rng)
        name = f'toy_{coco_split}_{index:05d}'
        image_id = index + 1
        Image.fromarray(image).save(osp.join(coco_root, coco_split, name + '.jpg'), quality=95)
        Image.fromarray(image).save(osp.join(ade_root, 'images', ade_split, name + '.jpg'),
                                    quality=95)
        label_map = np.zeros((spec.height, spec.width), np.uint8)
        for shape, mask in zip(shapes, masks):
            label_map[mask] = shape.label + 1
            annotations.append(_coco_annotation(shape, mask, len(annotations) + 1, image_id))
        Image.fromarray(label_map).save(osp.join(ade_root, 'annotations', ade_split,
                                                 name + '.png'))
        images.append(dict(id=image_id, file_name=name + '.jpg', height=spec.height,
                           width=spec.width))
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories)


def read_manifest(data_root: str) -> Optional[dict]:
    """The spec the toy data under ``data_root`` was generated with, or None."""
    path = osp.join(data_root, MANIFEST)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def generate_toy_datasets(data_root: str = 'data', spec: ToyDataSpec = ToyDataSpec(),
                          force: bool = False) -> Dict[str, str]:
    """Write ``toy_coco`` and ``toy_ade`` under ``data_root`` unless already up to date.

    Args:
        data_root (str): Folder that receives ``toy_coco/``, ``toy_ade/`` and the
            manifest. Defaults to ``'data'``.
        spec (ToyDataSpec): Sizes and seed.
        force (bool): Regenerate even if the manifest matches ``spec``.

    Returns:
        dict: ``{'coco': path, 'ade': path, 'generated': 'yes' | 'no'}``.
    """
    coco_root, ade_root = osp.join(data_root, 'toy_coco'), osp.join(data_root, 'toy_ade')
    paths = dict(coco=coco_root, ade=ade_root)
    if not force and read_manifest(data_root) == asdict(spec) and all(map(osp.isdir, [
            osp.join(coco_root, 'val'), osp.join(ade_root, 'annotations', 'validation')])):
        return dict(paths, generated='no')
    os.makedirs(osp.join(coco_root, 'annotations'), exist_ok=True)
    manifest = osp.join(data_root, MANIFEST)
    if osp.exists(manifest):  # a half-written dataset must not look complete
        os.remove(manifest)
    rng = np.random.RandomState(spec.seed)
    for coco_split, ade_split, count in (('train', 'training', spec.num_train),
                                         ('val', 'validation', spec.num_val)):
        coco = _write_split(spec, count, rng, coco_root, coco_split, ade_root, ade_split)
        with atomic_open(osp.join(coco_root, 'annotations', f'instances_{coco_split}.json')
                         ) as f:
            json.dump(coco, f)
    with atomic_open(manifest) as f:  # last, and whole: it marks the data complete
        json.dump(asdict(spec), f, indent=1)
    return dict(paths, generated='yes')
