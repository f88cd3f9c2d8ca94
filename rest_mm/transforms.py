"""``AlignResize``: the authors' ADE20K test-time resize, for mmseg 1.x pipelines.

The authors' mmseg 0.x backbone computes stage sizes as ``H // stride`` and so needs
images whose sides are multiples of 32; their ``AlignResize`` rescales an image into a
scale keeping its aspect ratio, then resizes it to the next multiples of 32. Ours takes any
size (the configs segment test images at their natural size); the ``*_align32`` configs use
this transform to evaluate exactly as the authors did. Imported through
``custom_imports=dict(imports=['rest_mm.transforms'])``, which registers it in mmseg's
``TRANSFORMS``.
"""
import math
from typing import Optional, Tuple

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS


@TRANSFORMS.register_module()
class AlignResize(BaseTransform):
    """Rescale keeping the aspect ratio, then resize to multiples of ``size_divisor``.

    Two resizes, as the authors' transform does them: ``mmcv.imrescale`` into ``scale``
    (the long side at most ``max(scale)``, the short side at most ``min(scale)``), then
    ``mmcv.imresize`` of that image to ``ceil(h / d) * d`` x ``ceil(w / d) * d``. A
    ``gt_seg_map`` present in the results is resized the same way with nearest
    interpolation.

    Required keys: ``img``. Modified keys: ``img``, ``gt_seg_map`` (if present),
    ``img_shape``. Added keys: ``scale``, ``scale_factor``, ``keep_ratio``.

    Args:
        scale (tuple[int, int]): The box to rescale into, ``(long, short)`` in either order,
            e.g. ``(2048, 512)``.
        size_divisor (int): The sides of the output are multiples of this. Defaults to 32.
        interpolation (str): Interpolation of the image, as ``mmcv.imresize`` names it.
            Defaults to ``'bilinear'``.
        backend (str): ``'cv2'`` or ``'pillow'``. Defaults to ``'cv2'`` (the authors').
    """

    def __init__(self, scale: Tuple[int, int], size_divisor: int = 32,
                 interpolation: str = 'bilinear', backend: str = 'cv2'):
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or not all(isinstance(s, int) and s > 0 for s in scale)):
            raise ValueError(f'AlignResize: scale must be two positive ints, e.g. (2048, 512), '
                             f'got {scale!r}')
        if not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f'AlignResize: size_divisor must be a positive int, '
                             f'got {size_divisor!r}')
        if backend not in ('cv2', 'pillow'):
            raise ValueError(f"AlignResize: backend must be 'cv2' or 'pillow', got {backend!r}")
        self.scale = tuple(scale)
        self.size_divisor = size_divisor
        self.interpolation = interpolation
        self.backend = backend

    def _align(self, size: int) -> int:
        return int(math.ceil(size / self.size_divisor)) * self.size_divisor

    def _resize(self, image: np.ndarray, interpolation: str) -> np.ndarray:
        rescaled = mmcv.imrescale(image, self.scale, interpolation=interpolation,
                                  backend=self.backend)
        h, w = rescaled.shape[:2]
        return mmcv.imresize(rescaled, (self._align(w), self._align(h)),
                             interpolation=interpolation, backend=self.backend)

    def transform(self, results: dict) -> Optional[dict]:
        h, w = results['img'].shape[:2]
        image = self._resize(results['img'], self.interpolation)
        new_h, new_w = image.shape[:2]
        results['img'] = image
        results['img_shape'] = (new_h, new_w)
        results['scale'] = (new_w, new_h)
        results['scale_factor'] = (new_w / w, new_h / h)
        results['keep_ratio'] = True
        if results.get('gt_seg_map') is not None:
            results['gt_seg_map'] = self._resize(results['gt_seg_map'], 'nearest')
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(scale={self.scale}, size_divisor={self.size_divisor}, '
                f'interpolation={self.interpolation!r}, backend={self.backend!r})')
