# Mask R-CNN with a ResTv2-Small backbone: the ResTv2-Tiny 3x recipe (and where to put the
# weights) with another arch and its stochastic depth.
# Published numbers and sizes: metafile.yml.
_base_ = ['./mask_rcnn_restv2_tiny_3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,  # the authors' builder
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small.pth')))
