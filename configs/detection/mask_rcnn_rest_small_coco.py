# Mask R-CNN with a ResT-Small backbone on COCO, 1x schedule (12 epochs), the authors' recipe:
# AdamW (lr 1e-4, weight decay 0.05, none on normalization layers), 16 images per batch
# (2 per GPU x 8 GPUs), multi-scale training with the short side in 640-800.
# Published size: 33.3 M parameters.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)

# The authors' ImageNet-1k weights, as downloaded (the converter in rest_mm reads their
# layout) or after `python tools/convert_weights.py`. Put the file here, or point the
# path at it; init_cfg=None trains from scratch.
model = dict(
    backbone=dict(
        _delete_=True,
        type='ResT',
        arch='small',
        out_indices=(0, 1, 2, 3),
        # Not stated in the authors' recipe: stochastic depth as in mmdet's PVT configs.
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# The short side is one of 640, 672, ..., 800 (the long side at most 1333).
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, short) for short in range(640, 801, 32)],
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    # By module type: every BatchNorm and LayerNorm, in the backbone and the heads.
    paramwise_cfg=dict(norm_decay_mult=0.))
