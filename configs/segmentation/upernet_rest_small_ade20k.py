# UperNet with a ResT (v1) Small backbone on ADE20K: the ResTv2-Tiny recipe (and where to put
# the weights) with the v1 backbone and the head widths that go with it.
_base_ = ['./upernet_restv2_tiny_ade20k.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResT',
        arch='small',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
