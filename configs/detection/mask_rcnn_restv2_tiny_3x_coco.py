# Mask R-CNN with a ResTv2-Tiny backbone on COCO, 3x schedule (36 epochs): the ResT Mask
# R-CNN recipe (AdamW lr 1e-4, weight decay 0.05, none on normalization layers, 2 images
# per GPU x 8 GPUs) with the short side in 480-800 and steps at epochs 27 and 33.
# Published size: 49.9 M parameters.
_base_ = ['./mask_rcnn_rest_small_coco.py']

# The authors' ResTv2 ImageNet-1k weights, as downloaded or converted (see the ResT config).
model = dict(
    backbone=dict(
        _delete_=True,
        type='ResTV2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        # Not stated in the authors' recipe: stochastic depth as in mmdet's Swin-T 3x config.
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))

# The short side is one of 480, 512, ..., 800 (the long side at most 1333).
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, short) for short in range(480, 801, 32)],
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]
