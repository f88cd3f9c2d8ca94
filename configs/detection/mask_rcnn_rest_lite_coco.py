# Mask R-CNN with a ResT-Lite backbone: the ResT-Small recipe (and where to put the
# weights) with another arch.
_base_ = ['./mask_rcnn_rest_small_coco.py']

model = dict(
    backbone=dict(
        arch='lite',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_lite.pth')))
