# UperNet with a ResTv2-Small backbone: the ResTv2-Tiny recipe (and where to put the
# weights) with another arch and the authors' drop path for it, 0.2.
# The authors' Small config also changes the optimizer (see docs/recipes.md for why
# that is not reproduced here).
# Published numbers and sizes: metafile.yml.
_base_ = ['./upernet_restv2_tiny_ade20k.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small.pth')))
