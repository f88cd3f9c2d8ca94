# Mask R-CNN with a ResT-Base backbone: the ResT-Small recipe (and where to put the
# weights) with another arch, its stochastic depth and the neck widths that go with it.
# Published numbers and sizes: metafile.yml.
_base_ = ['./mask_rcnn_rest_small_coco.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.2,  # the authors' builder: Base and Large 0.2
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_base.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
