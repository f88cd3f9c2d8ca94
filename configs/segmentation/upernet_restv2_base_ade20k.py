# UperNet with a ResTv2-Base backbone: the ResTv2-Tiny recipe (and where to put the
# weights) with another arch and the authors' drop path for it, 0.3.
# The authors' Base config also changes the optimizer (see docs/recipes.md for why
# that is not reproduced here).
# Published numbers and sizes: metafile.yml.
_base_ = ['./upernet_restv2_tiny_ade20k.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_base.pth')))
