# Mask R-CNN with a ResT-Small backbone on COCO: the authors' detectron2 recipe
# (object_detection/configs/ResTv1/mask_rcnn_rest_small_FPN_1x.yaml over Base-RCNN-FPN.yaml,
# their backbone builder and train_net.py, and detectron2's defaults for what they leave
# unset). docs/recipes.md lists every item; tests/test_recipes.py checks them.
# Published numbers and sizes: metafile.yml.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../_base_/detectron2_1x.py',
    '../_base_/detectron2_v1_input.py',
]

custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)

# detectron2's input for the authors' v1 detectors (BGR preprocessing, PIL decoding and
# resizing, the scales): ../_base_/detectron2_v1_input.py, which says why it is popped.
_input = _base_.pop('detectron2_v1_input')

# The authors' ImageNet-1k weights, as downloaded (the converter in rest_mm reads their
# layout) or after `python tools/convert_weights.py`. Put the file here, or point the
# path at it; init_cfg=None trains from scratch.
model = dict(
    data_preprocessor=_input.data_preprocessor,
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

# INPUT.CROP: a random 0.9 x 0.9 crop first (detectron2 inserts it before the resize), the
# boxes recomputed from the cropped masks, images kept even if the crop leaves no object.
train_pipeline = [
    dict(_input.load_image, backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomCrop', crop_type='relative', crop_size=(0.9, 0.9),
         recompute_bbox=True, allow_negative_crop=True),
    _input.train_resize,
    dict(type='RandomFlip', prob=0.5),
    # detectron2's filter_empty_instances: objects the crop left without a box or mask go.
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True,
         keep_empty=False),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(_input.load_image, backend_args=_base_.backend_args),
    _input.test_resize,
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    _input.test_pack
]
del _input  # a helper, not a config key
# Schedule and AdamW: ../_base_/detectron2_1x.py.
train_dataloader = dict(batch_size=2, sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# The authors' train_net.py clips the gradient of the whole model to an L2 norm of 0.01
# (Base-RCNN-FPN.yaml CLIP_GRADIENTS); the optimizer is the schedule base's AdamW.
optim_wrapper = dict(clip_grad=dict(max_norm=0.01, norm_type=2))
