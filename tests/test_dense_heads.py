"""rest_mm.dense_heads: RetinaNet's head with detectron2's post-processing order."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from testlib import needs_full_stack

pytestmark = needs_full_stack


def test_late_clipping_head_refuses_a_clipping_coder_and_clips_after_rescaling():
    from mmdet.registry import MODELS
    from mmengine.structures import InstanceData

    import rest_mm.dense_heads  # noqa: F401  (registers LateClippingRetinaHead in mmdet)
    head_cfg = dict(type='LateClippingRetinaHead', num_classes=2, in_channels=8,
                    feat_channels=8, stacked_convs=1,
                    anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                          scales_per_octave=1, ratios=[1.0], strides=[8]),
                    bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4,
                                    target_stds=[1.] * 4))
    # mmdet's scope, whatever scope an earlier test left as the default
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError, match='clip_border=False'):
            MODELS.build(head_cfg)
        head = MODELS.build(dict(head_cfg, bbox_coder=dict(head_cfg['bbox_coder'],
                                                           clip_border=False)))
    results = InstanceData(bboxes=torch.tensor([[-10., 5., 50., 300.], [210., 5., 260., 9.]]),
                           scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 1]))
    cfg = Config(dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    out = head._bbox_post_process(results, cfg, rescale=True, with_nms=True,
                                  img_meta=dict(scale_factor=(2., 2.), ori_shape=(100, 100)))
    # rescaled to the original image, clipped to it; the box left empty is dropped
    assert out.bboxes.tolist() == [[0., 2.5, 25., 100.]]
