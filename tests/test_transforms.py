"""rest_mm.transforms: AlignResize, the authors' test-time resize."""

import numpy as np
import pytest

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)

from testlib import needs_full_stack

pytestmark = needs_full_stack


# --- the authors' test-time resize -------------------------------------------------------
@pytest.mark.parametrize('shape,scale,expected', [
    ((512, 683), (2048, 512), (512, 704)),    # an ADE20K-like image: only the width aligns
    ((480, 640), (2048, 512), (512, 704)),    # 480x640 -> 512x683 (rescale) -> 512x704
    ((512, 683), (1024, 256), (256, 352)),    # the 0.5 test ratio: 256x342 -> 256x352
    ((300, 2500), (2048, 512), (256, 2048)),  # long side bound: 246x2048 -> 256x2048
])
def test_align_resize_rescales_then_aligns_to_32(shape, scale, expected):
    from rest_mm.transforms import AlignResize
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (*shape, 3), dtype=np.uint8)
    labels = rng.randint(0, 5, shape, dtype=np.uint8)
    results = AlignResize(scale=scale)(dict(img=image, gt_seg_map=labels))
    assert results['img'].shape == (*expected, 3)
    assert results['img_shape'] == expected and results['gt_seg_map'].shape == expected
    assert results['scale_factor'] == (expected[1] / shape[1], expected[0] / shape[0])
    assert set(np.unique(results['gt_seg_map'])) <= set(np.unique(labels))  # nearest


def test_align_resize_refuses_bad_arguments():
    from rest_mm.transforms import AlignResize
    with pytest.raises(ValueError, match='scale must be two positive ints'):
        AlignResize(scale=512)
    with pytest.raises(ValueError, match='size_divisor'):
        AlignResize(scale=(2048, 512), size_divisor=0)
