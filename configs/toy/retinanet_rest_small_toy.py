# RetinaNet-ResT-Small trained from scratch on the built-in shapes data (tools/main_job.py,
# `make demo`). Only the data and the schedule differ from the COCO config: 3 classes,
# 128x160 images, a short schedule and twice the learning rate (training from scratch).
# Generate the data with `python tools/make_toy_data.py`.
_base_ = ['../detection/retinanet_rest_small_coco.py']

data_root = 'data/toy_coco/'
metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'),
                palette=[(220, 20, 60), (20, 160, 60), (30, 60, 220)])
image_scale = (160, 128)  # (w, h): the toy images' own size

# No pretrained weights are needed (or available offline): train from scratch.
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=3))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
# Decoding 128x160 JPEGs is cheap: worker processes would only compete for the CPU.
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=8), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# Schedule: a short warm-up, then a cosine decay over the whole run.
max_epochs = 12
# Epochs, where the COCO config counts detectron2's iterations.
train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=max_epochs,
                 val_interval=4)
optim_wrapper = dict(optimizer=dict(lr=2e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=60),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-5)
]
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(by_epoch=True, interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=10, by_epoch=True)
randomness = dict(seed=0)
