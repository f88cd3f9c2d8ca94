# Mask R-CNN with a ResT-Small backbone on COCO: the authors' detectron2 recipe
# (object_detection/configs/ResTv1/mask_rcnn_rest_small_FPN_1x.yaml over Base-RCNN-FPN.yaml,
# their backbone builder and train_net.py, and detectron2's defaults for what they leave
# unset). docs/recipes.md lists every item; tests/test_recipes.py checks them.
# Published numbers and sizes: metafile.yml.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../_base_/detectron2_1x.py',
]

custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)

# The authors' ImageNet-1k weights, as downloaded (the converter in rest_mm reads their
# layout) or after `python tools/convert_weights.py`. Put the file here, or point the
# path at it; init_cfg=None trains from scratch.
model = dict(
    # detectron2's default input, which the authors' v1 detectors were trained and
    # evaluated with: BGR images, its BGR pixel mean and a std of 1 (a later yaml of theirs
    # calls this a mistake, but their published numbers and released models come from it).
    data_preprocessor=dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0],
                           bgr_to_rgb=False),
    backbone=dict(
        _delete_=True,
        type='ResT',
        arch='small',
        out_indices=(0, 1, 2, 3),
        # As in the authors' detectron2 backbone: each output norm sits in the main path.
        norm_in_path=True,
        # The authors' builder: Lite and Small 0.1, Base and Large 0.2.
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# detectron2 decodes and resizes images with PIL (bilinear, antialiased when shrinking).
# INPUT.CROP: a random 0.9 x 0.9 crop first (detectron2 inserts it before the resize), the
# boxes recomputed from the cropped masks, images kept even if the crop leaves no object;
# then the short side one of 640, 672, ..., 800, long side at most 1333.
train_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow',
         backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomCrop', crop_type='relative', crop_size=(0.9, 0.9),
         recompute_bbox=True, allow_negative_crop=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, short) for short in (640, 672, 704, 736, 768, 800)],
         keep_ratio=True, backend='pillow'),
    dict(type='RandomFlip', prob=0.5),
    # detectron2's filter_empty_instances: objects the crop left without a box or mask go.
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True,
         keep_empty=False),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow',
         backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True, backend='pillow'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
# Schedule and AdamW: ../_base_/detectron2_1x.py.
train_dataloader = dict(batch_size=2, sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# The authors' train_net.py clips the gradient of the whole model to an L2 norm of 0.01
# (Base-RCNN-FPN.yaml CLIP_GRADIENTS); the optimizer is the schedule base's AdamW.
optim_wrapper = dict(clip_grad=dict(max_norm=0.01, norm_type=2))
