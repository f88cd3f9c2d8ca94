# UperNet with a ResT (v1) Base backbone: the ResT-Small recipe (and where to put the
# weights) with another arch and the head widths that go with it.
_base_ = ['./upernet_rest_small_ade20k.py']

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_base.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
