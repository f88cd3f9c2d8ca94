# UperNet with a ResTv2-Base backbone: the ResTv2-Tiny recipe (and where to put the weights)
# with another arch and Swin's UperNet drop path, 0.3.
# Published size (auxiliary head included): 87.6 M parameters.
_base_ = ['./upernet_restv2_tiny_ade20k.py']

checkpoint_file = 'checkpoints/restv2_base.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
