# UperNet with a ResTv2-Tiny backbone on ADE20K: the authors' mmseg 0.x recipe
# (semantic_segmentation/configs/ResTv2/upernet_restv2_tiny_512_160k_ade20k.py), which is
# Swin's UperNet recipe: 512x512 crops, 160k iterations of 16 images (2 per GPU x 8 GPUs),
# AdamW (lr 6e-5, weight decay 0.01, none on parameters whose name contains 'norm'), a
# linear warm-up over 1500 iterations, then poly decay; drop path 0.1. docs/recipes.md
# lists every item; tests/test_recipes.py checks them.
# Published numbers (mIoU multi-scale + flip: `tools/test.py CONFIG CHECKPOINT --tta`) and
# sizes: metafile.yml.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)

# The authors' ImageNet-1k weights, as downloaded (the converter in rest_mm reads their
# layout) or after `python tools/convert_weights.py`. Put the file here, or point the
# path at it; init_cfg=None trains from scratch.
checkpoint_file = None  # the Swin base's ImageNet URL, unused: ours is in init_cfg
model = dict(
    backbone=dict(
        _delete_=True,
        type='ResTV2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
    # Test images keep their natural size (the short side resized to 512, e.g. 512x683)
    # and are segmented whole: the backbone takes any size, so the data preprocessor pads
    # only the training crops (to its `size`) and has no size_divisor and no test padding.
    # The authors' backbone needs multiples of 32: the *_align32 configs resize as they did.
    test_cfg=dict(mode='whole'))

# The optimizer is the Swin base's, as in the authors' config (their keys for Swin's
# position tables match nothing here; 'norm' also leaves the stem's and the heads'
# BatchNorms with weight decay, as it did for them). mmcv 1.x's poly schedule counts from
# iteration 0 and the warm-up multiplies it: a PolyLR from 0 beside the LinearLR. mmengine's
# schedulers reach their end value at iteration `end - 1`, mmcv 1.x's at `end`: hence +1.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1501),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160001, by_epoch=False)
]

# Multi-scale + flip testing as mmseg 0.x's `--aug-test` did it: each ratio scales the test
# scale (2048, 512) (mmseg 1.x's ADE20K tta_pipeline scales the image itself instead).
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_flips = [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
              for r in img_ratios],
             tta_flips, [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])
]

# The authors' test-time resize (their AlignResize): rescale into (2048, 512) keeping the
# aspect ratio, then resize to the next multiples of 32. The *_align32 configs use these.
align32_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='AlignResize', scale=(2048, 512), size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
align32_tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='AlignResize', scale=(int(2048 * r), int(512 * r)), size_divisor=32)
              for r in img_ratios],
             tta_flips, [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])
]
