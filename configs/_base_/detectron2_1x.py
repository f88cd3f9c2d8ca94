# detectron2's 1x schedule as the authors' detection projects ran it (their train_net.py
# and yaml files over detectron2's defaults), in place of mmdet's schedule_1x.py beside
# mmdet's model and dataset bases. detectron2 counts iterations of 16 images (2 per GPU x 8
# GPUs): 90k of them (12.3 COCO epochs), the learning rate x0.1 at 60k and 80k, evaluation
# at the end.
_base_ = ['mmdet::_base_/default_runtime.py']

max_iters = 90000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    # detectron2's warm-up: 1000 iterations, linear from 0.001 (mmengine's linear
    # scheduler reaches its end value at iteration `end - 1`, detectron2's at 1000).
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1001),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[60000, 80000], gamma=0.1)
]
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=5000))
log_processor = dict(by_epoch=False)

# AdamW, lr 1e-4, weight decay 0.05; none on normalization layers, found by module type
# as detectron2 does (WEIGHT_DECAY_NORM = 0).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))
auto_scale_lr = dict(enable=False, base_batch_size=16)
