# UperNet with a ResTv2-Small backbone: the ResTv2-Tiny recipe (and where to put the weights)
# with another arch and Swin's UperNet drop path, 0.3.
# Published size (auxiliary head included): 72.9 M parameters.
_base_ = ['./upernet_restv2_tiny_ade20k.py']

checkpoint_file = 'checkpoints/restv2_small.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
