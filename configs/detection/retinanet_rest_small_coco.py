# RetinaNet with a ResT-Small backbone on COCO: the authors' detectron2 recipe
# (object_detection/configs/ResTv1/retinanet_rest_small_FPN_1x.yaml over Base-RetinaNet.yaml,
# their backbone builder, and detectron2's defaults for what they leave unset). docs/recipes.md
# lists every item; tests/test_recipes.py checks them.
# Published numbers and sizes: metafile.yml.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::retinanet/retinanet_tta.py',
    '../_base_/detectron2_1x.py',
    '../_base_/detectron2_v1_input.py',
]

custom_imports = dict(imports=['rest_mm', 'rest_mm.dense_heads'], allow_failed_imports=False)

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
        # Stages 2-4 feed P3-P5; stage 1 gets no output norm (an unused one would stop DDP).
        out_indices=(1, 2, 3),
        # As in the authors' detectron2 backbone: each output norm sits in the main path.
        norm_in_path=True,
        # The authors' builder: Lite and Small 0.1, Base and Large 0.2.
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth')),
    # detectron2's LastLevelP6P7 as the authors' builder wires it: P6 from stage 4's output
    # itself ('on_input'), a ReLU between P6 and P7.
    neck=dict(in_channels=[128, 256, 512], start_level=0, add_extra_convs='on_input',
              relu_before_extra_convs=True),
    # detectron2's RetinaNet runs NMS on unclipped boxes and clips the survivors to the
    # image afterwards (rest_mm's LateClippingRetinaHead); training is RetinaHead's.
    bbox_head=dict(type='LateClippingRetinaHead', bbox_coder=dict(clip_border=False)))

train_pipeline = [
    dict(_input.load_image, backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    _input.train_resize,
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(_input.load_image, backend_args=_base_.backend_args),
    _input.test_resize,
    dict(type='LoadAnnotations', with_bbox=True),
    _input.test_pack
]
del _input  # a helper, not a config key
# Schedule and AdamW: ../_base_/detectron2_1x.py; no gradient clipping (Base-RetinaNet.yaml).
train_dataloader = dict(batch_size=2, sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
