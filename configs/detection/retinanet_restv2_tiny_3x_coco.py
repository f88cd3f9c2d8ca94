# RetinaNet with a ResTv2-Tiny backbone on COCO, 3x: the authors'
# object_detection/configs/ResTv2/retinanet_restv2_tiny_FPN_3x.yaml over Base-RetinaNet.yaml
# (no published number). That yaml names a backbone builder that is not in their repository
# (`build_retinanet_swint_fpn_backbone`, for Swin-T); this uses ResTv2-T wired as their
# `build_retinanet_restv2_fpn_backbone` wires it: stages 2-4, P6 from stage 4's output, a
# ReLU before P7. RGB ImageNet input, short sides 384-1024 (long side at most 1333,
# detectron2's default), 270k iterations, mixed precision, no crop, no clipping.
_base_ = ['./retinanet_rest_small_coco.py']

model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='ResTV2',
        arch='tiny',
        out_indices=(1, 2, 3),
        drop_path_rate=0.1,  # the authors' builder: Tiny 0.1
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny.pth')),
    neck=dict(in_channels=[192, 384, 768]))

train_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow',
         backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, short) for short in (384, 512, 640, 768, 896, 1024)],
         keep_ratio=True, backend='pillow'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# 270k iterations of 16 images, x0.1 at 210k and 250k, evaluation every 30k (EVAL_PERIOD).
max_iters = 270000
train_cfg = dict(max_iters=max_iters, val_interval=30000)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1001),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[210000, 250000], gamma=0.1)
]

# Mixed precision; the ResTv2 output norms get weight decay as in the authors' detectron2
# runs (see mask_rcnn_restv2_tiny_3x_coco.py).
optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(
        custom_keys={f'backbone.norm{i}.': dict(decay_mult=1.) for i in range(4)}))
