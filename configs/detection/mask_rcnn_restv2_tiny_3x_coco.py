# Mask R-CNN with a ResTv2-Tiny backbone on COCO, 3x: the authors' detectron2 recipe
# (object_detection/configs/ResTv2/mask_rcnn_restv2_tiny_FPN_3x.yaml over Base-RCNN-FPN.yaml):
# the ResT Mask R-CNN recipe (crop, gradient clipping, AdamW) with RGB ImageNet input,
# short sides 480-800, 270k iterations and mixed precision. docs/recipes.md lists every
# item; tests/test_recipes.py checks them.
# Published numbers and sizes: metafile.yml.
_base_ = ['./mask_rcnn_rest_small_coco.py']

# The authors' ResTv2 ImageNet-1k weights, as downloaded or converted (see the ResT config).
model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='ResTV2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        # The authors' builder: Tiny 0.1, Small 0.2, Base 0.3.
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))

# The ResT pipeline (PIL, the 0.9 x 0.9 crop first) with the yaml's short sides.
train_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow',
         backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomCrop', crop_type='relative', crop_size=(0.9, 0.9),
         recompute_bbox=True, allow_negative_crop=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, short) for short in (480, 512, 534, 576, 640, 672, 704, 736, 768, 800)],
         keep_ratio=True, backend='pillow'),
    dict(type='RandomFlip', prob=0.5),
    # detectron2's filter_empty_instances: objects the crop left without a box or mask go.
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True,
         keep_empty=False),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# 270k iterations of 16 images, the learning rate x0.1 at 210k and 250k, evaluation every
# 20k (the yaml's EVAL_PERIOD); warm-up as in the ResT config.
max_iters = 270000
train_cfg = dict(max_iters=max_iters, val_interval=20000)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1001),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[210000, 250000], gamma=0.1)
]

# Mixed precision (SOLVER.AMP), the ResT optimizer and clipping otherwise. detectron2 finds
# norm layers by type; the authors' ResTv2 output norms are their own channels-first
# LayerNorm class, which it does not know, so those four got weight decay: so here.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(
        custom_keys={f'backbone.norm{i}.': dict(decay_mult=1.) for i in range(4)}))
