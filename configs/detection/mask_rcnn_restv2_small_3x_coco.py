# Mask R-CNN with a ResTv2-Small backbone: the ResTv2-Tiny 3x recipe (and where to put the
# weights) with another arch. Published size: 60.7 M parameters.
_base_ = ['./mask_rcnn_restv2_tiny_3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small.pth')))
