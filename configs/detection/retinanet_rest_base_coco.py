# RetinaNet with a ResT-Base backbone: the ResT-Small recipe (and where to put the
# weights) with another arch and the neck widths that go with it.
# Published size: 40.5 M parameters.
_base_ = ['./retinanet_rest_small_coco.py']

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_base.pth')),
    neck=dict(in_channels=[192, 384, 768]))
