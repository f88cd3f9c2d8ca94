# UperNet-ResTv2-Tiny trained from scratch on the built-in shapes data (ADE20K layout).
# Only the data and the schedule differ from the ADE20K config: 4 classes (background
# included, so nothing is ignored), 128x160 images, a short schedule with a larger learning
# rate, and BN instead of SyncBN so it runs on a CPU.
# Generate the data with `python tools/make_toy_data.py`.
_base_ = ['../segmentation/upernet_restv2_tiny_ade20k.py']

data_root = 'data/toy_ade/'
metainfo = dict(classes=('background', 'rectangle', 'ellipse', 'triangle'),
                palette=[(0, 0, 0), (220, 20, 60), (20, 160, 60), (30, 60, 220)])
image_size = (128, 160)  # (h, w): the toy images' own size
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=image_size),
    backbone=dict(init_cfg=None),  # no pretrained weights offline: train from scratch
    decode_head=dict(num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=4, norm_cfg=norm_cfg))

dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=False)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# Decoding 128x160 JPEGs is cheap: worker processes would only compete for the CPU.
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation')))
test_dataloader = val_dataloader

# Multi-scale + flip testing (--tta) around the toy images' own size rather than ADE20K's
# (2048, 512): the ADE20K config's ratios and flips.
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=(int(image_size[1] * r), int(image_size[0] * r)),
                   keep_ratio=True) for r in [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]],
             {{_base_.tta_flips}}, [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])
]

max_iters = 300
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=6e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=30, end=max_iters, by_epoch=False)
]
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
log_processor = dict(window_size=10)
randomness = dict(seed=0)
