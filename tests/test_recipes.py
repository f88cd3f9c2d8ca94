"""The authors' recipes, item by item, against our configs.

``RECIPE`` is the one place the recipe facts are written: each row names an item, the
configs it concerns, the key of the resolved config that carries it, the authors' value
(read from their detectron2 yaml files, backbone builders and train_net.py, their mmseg 0.x
configs, and detectron2's defaults for what they leave unset) and, where this repo keeps
something else, our value and why. The tests check every config's resolved values against
the table, the README's "Configs" table against the same rows, and the behaviour behind the
values that need it (which parameters get weight decay, the learning-rate curves, the
authors' test-time resize, ``tools/test.py --tta``).
"""
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)

from testlib import CONFIG_DIR, REPO

RETINANET_V1 = [f'detection/retinanet_rest_{a}_coco.py' for a in ('lite', 'small', 'base', 'large')]
MASK_RCNN_V1 = [f'detection/mask_rcnn_rest_{a}_coco.py' for a in ('lite', 'small', 'base', 'large')]
MASK_RCNN_V2 = [f'detection/mask_rcnn_restv2_{a}_3x_coco.py' for a in ('tiny', 'small', 'base')]
RETINANET_V2 = ['detection/retinanet_restv2_tiny_3x_coco.py']
RETINANET = RETINANET_V1 + RETINANET_V2
MASK_RCNN = MASK_RCNN_V1 + MASK_RCNN_V2
DETECTION_V1 = RETINANET_V1 + MASK_RCNN_V1
DETECTION_V2 = MASK_RCNN_V2 + RETINANET_V2
DETECTION = DETECTION_V1 + DETECTION_V2
UPERNET = {a: f'segmentation/upernet_restv2_{a}_ade20k.py' for a in ('tiny', 'small', 'base')}
UPERNET_ALIGN32 = {a: f'segmentation/upernet_restv2_{a}_ade20k_align32.py' for a in UPERNET}
UPERNET_ALL = list(UPERNET.values()) + list(UPERNET_ALIGN32.values())


def _both(arch: str) -> list:
    return [UPERNET[arch], UPERNET_ALIGN32[arch]]


SAME = object()  # this repo's value is the authors'


class Item(NamedTuple):
    """One recipe item for some configs.

    ``key`` addresses the resolved config: dot-separated keys and list indices; ``name[T]``
    is the element of list ``name`` whose ``type`` is ``T``; ``*`` maps the rest of the
    path over a list; a last part ``{a,b}`` gathers those keys into a dict (a missing key
    reads as None).
    """
    item: str
    configs: str  # which models, in words (the README's wording)
    paths: Sequence[str]
    key: str
    authors: Any
    source: str  # where the authors' value comes from
    ours: Any = SAME
    why: str = ''


D2_MEAN_BGR = [103.53, 116.28, 123.675]
IMAGENET_RGB = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
V2_OUTPUT_NORMS_DECAY = {f'backbone.norm{i}.': dict(decay_mult=1.0) for i in range(4)}
SWIN_PARAMWISE = dict(custom_keys={'absolute_pos_embed': dict(decay_mult=0.0),
                                   'relative_position_bias_table': dict(decay_mult=0.0),
                                   'norm': dict(decay_mult=0.0)})
TTA_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

RECIPE = [
    # --- detection: backbone and neck -------------------------------------------------
    Item('ResT v1 output norms in the main path (the next stage consumes the normalised map)',
         'v1 RetinaNet, Mask R-CNN', DETECTION_V1, 'model.backbone.norm_in_path', True,
         'restv2/rest.py ResT.forward'),
    Item('Stochastic depth', 'ResT-Lite, ResT-S', [p for p in DETECTION_V1 if 'lite' in p or
                                                    'small' in p],
         'model.backbone.drop_path_rate', 0.1, 'restv2/rest.py build_rest_backbone'),
    Item('Stochastic depth', 'ResT-B, ResT-L', [p for p in DETECTION_V1 if 'base' in p or
                                                 'large' in p],
         'model.backbone.drop_path_rate', 0.2, 'restv2/rest.py build_rest_backbone'),
    Item('Stochastic depth', 'ResTv2-T detectors', [p for p in DETECTION_V2 if 'tiny' in p],
         'model.backbone.drop_path_rate', 0.1, 'restv2/restv2.py build_restv2_backbone'),
    Item('Stochastic depth', 'ResTv2-S detector', [p for p in DETECTION_V2 if 'small' in p],
         'model.backbone.drop_path_rate', 0.2, 'restv2/restv2.py build_restv2_backbone'),
    Item('Stochastic depth', 'ResTv2-B detector', [p for p in DETECTION_V2 if 'base' in p],
         'model.backbone.drop_path_rate', 0.3, 'restv2/restv2.py build_restv2_backbone'),
    Item('Backbone stages used', 'RetinaNet', RETINANET, 'model.backbone.out_indices',
         [1, 2, 3], 'yaml FPN.IN_FEATURES stage2-4'),
    Item('Backbone stages used', 'Mask R-CNN', MASK_RCNN, 'model.backbone.out_indices',
         [0, 1, 2, 3], 'yaml FPN.IN_FEATURES stage1-4'),
    Item('P6 from stage 4\'s output, a ReLU before P7', 'RetinaNet', RETINANET,
         'model.neck.{start_level,add_extra_convs,relu_before_extra_convs,num_outs}',
         dict(start_level=0, add_extra_convs='on_input', relu_before_extra_convs=True,
              num_outs=5),
         'detectron2 LastLevelP6P7(in_feature="stage4")'),
    # --- detection: input -------------------------------------------------------------
    Item('Input: BGR, detectron2\'s pixel mean, std 1', 'v1 RetinaNet, Mask R-CNN',
         DETECTION_V1, 'model.data_preprocessor.{mean,std,bgr_to_rgb}',
         dict(mean=D2_MEAN_BGR, std=[1.0, 1.0, 1.0], bgr_to_rgb=False),
         'detectron2 defaults (PIXEL_MEAN/STD, FORMAT BGR); the v1 yaml files set none'),
    Item('Input: RGB, ImageNet mean and std', 'ResTv2 detectors', DETECTION_V2,
         'model.data_preprocessor.{mean,std,bgr_to_rgb}', dict(**IMAGENET_RGB, bgr_to_rgb=True),
         'ResTv2 yaml PIXEL_MEAN, PIXEL_STD, FORMAT RGB'),
    Item('Batch padded to a multiple of 32', 'all detectors', DETECTION,
         'model.data_preprocessor.pad_size_divisor', 32,
         'detectron2 FPN size_divisibility (stride of stage 4)'),
    Item('Images decoded with PIL', 'all detectors', DETECTION,
         'train_dataloader.dataset.pipeline[LoadImageFromFile].imdecode_backend', 'pillow',
         'detectron2 utils.read_image'),
    Item('Images decoded with PIL (test)', 'all detectors', DETECTION,
         'test_dataloader.dataset.pipeline[LoadImageFromFile].imdecode_backend', 'pillow',
         'detectron2 utils.read_image'),
    Item('Training pipeline order (crop before the resize)', 'Mask R-CNN', MASK_RCNN,
         'train_dataloader.dataset.pipeline.*.type',
         ['LoadImageFromFile', 'LoadAnnotations', 'RandomCrop', 'RandomChoiceResize',
          'RandomFlip', 'FilterAnnotations', 'PackDetInputs'],
         'Base-RCNN-FPN.yaml INPUT.CROP; detectron2 inserts RandomCrop first'),
    Item('Objects the crop leaves without a box or mask are dropped, the image kept',
         'Mask R-CNN', MASK_RCNN, 'train_dataloader.dataset.pipeline[FilterAnnotations]',
         dict(type='FilterAnnotations', min_gt_bbox_wh=[1e-5, 1e-5], by_mask=True,
              keep_empty=False),
         'detectron2 utils.filter_empty_instances (box side > 1e-5, mask not empty)'),
    Item('Training pipeline order (no crop)', 'RetinaNet', RETINANET,
         'train_dataloader.dataset.pipeline.*.type',
         ['LoadImageFromFile', 'LoadAnnotations', 'RandomChoiceResize', 'RandomFlip',
          'PackDetInputs'], 'Base-RetinaNet.yaml (CROP off by default)'),
    Item('Random relative crop 0.9 x 0.9, boxes recomputed from the masks', 'Mask R-CNN',
         MASK_RCNN, 'train_dataloader.dataset.pipeline[RandomCrop]',
         dict(type='RandomCrop', crop_type='relative', crop_size=[0.9, 0.9],
              recompute_bbox=True, allow_negative_crop=True),
         'Base-RCNN-FPN.yaml INPUT.CROP; detectron2 recomputes boxes when cropping masks and '
         'keeps images the crop empties'),
    Item('Training short sides (long side at most 1333), PIL bilinear', 'v1 RetinaNet, '
         'Mask R-CNN', DETECTION_V1,
         'train_dataloader.dataset.pipeline[RandomChoiceResize].{scales,keep_ratio,backend}',
         dict(scales=[[1333, s] for s in (640, 672, 704, 736, 768, 800)], keep_ratio=True,
              backend='pillow'),
         'Base yaml MIN_SIZE_TRAIN; detectron2 MAX_SIZE_TRAIN, ResizeShortestEdge'),
    Item('Training short sides (long side at most 1333), PIL bilinear', 'Mask R-CNN ResTv2 3x',
         MASK_RCNN_V2,
         'train_dataloader.dataset.pipeline[RandomChoiceResize].{scales,keep_ratio,backend}',
         dict(scales=[[1333, s] for s in (480, 512, 534, 576, 640, 672, 704, 736, 768, 800)],
              keep_ratio=True, backend='pillow'),
         'ResTv2 yaml MIN_SIZE_TRAIN; detectron2 MAX_SIZE_TRAIN'),
    Item('Training short sides (long side at most 1333), PIL bilinear', 'RetinaNet ResTv2-T 3x',
         RETINANET_V2,
         'train_dataloader.dataset.pipeline[RandomChoiceResize].{scales,keep_ratio,backend}',
         dict(scales=[[1333, s] for s in (384, 512, 640, 768, 896, 1024)], keep_ratio=True,
              backend='pillow'),
         'retinanet_restv2_tiny_FPN_3x.yaml MIN_SIZE_TRAIN; detectron2 MAX_SIZE_TRAIN'),
    Item('Test size: short side 800, long side at most 1333, PIL bilinear', 'all detectors',
         DETECTION, 'test_dataloader.dataset.pipeline[Resize].{scale,keep_ratio,backend}',
         dict(scale=[1333, 800], keep_ratio=True, backend='pillow'),
         'detectron2 MIN/MAX_SIZE_TEST, ResizeShortestEdge'),
    # --- detection: test-time settings (mmdet's defaults equal detectron2's) --------------
    Item('Test: top 1000 per level, score > 0.05, NMS 0.5, 100 per image', 'RetinaNet',
         RETINANET, 'model.test_cfg.{nms_pre,score_thr,nms,max_per_img}',
         dict(nms_pre=1000, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
              max_per_img=100), 'detectron2 RETINANET.*_TEST, TEST.DETECTIONS_PER_IMAGE'),
    Item('Boxes clipped to the image after NMS, not before', 'RetinaNet', RETINANET,
         '{model.bbox_head.type,model.bbox_head.bbox_coder.clip_border}',
         {'model.bbox_head.type': 'LateClippingRetinaHead',
          'model.bbox_head.bbox_coder.clip_border': False},
         'detectron2 RetinaNet.inference_single_image, detector_postprocess'),
    Item('RPN: 2000 per level before NMS 0.7, 1000 after (training)', 'Mask R-CNN', MASK_RCNN,
         'model.train_cfg.rpn_proposal.{nms_pre,max_per_img,nms}',
         dict(nms_pre=2000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7)),
         'Base-RCNN-FPN.yaml PRE/POST_NMS_TOPK_TRAIN; detectron2 RPN.NMS_THRESH'),
    Item('RPN: 1000 per level before NMS 0.7, 1000 after (test)', 'Mask R-CNN', MASK_RCNN,
         'model.test_cfg.rpn.{nms_pre,max_per_img,nms}',
         dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7)),
         'Base-RCNN-FPN.yaml PRE/POST_NMS_TOPK_TEST; detectron2 RPN.NMS_THRESH'),
    Item('Test boxes: score > 0.05, NMS 0.5, 100 per image; masks at 0.5', 'Mask R-CNN',
         MASK_RCNN, 'model.test_cfg.rcnn.{score_thr,nms,max_per_img,mask_thr_binary}',
         dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100,
              mask_thr_binary=0.5),
         'detectron2 ROI_HEADS.*_TEST, TEST.DETECTIONS_PER_IMAGE, mask paste threshold'),
    # --- detection: optimisation ------------------------------------------------------
    Item('AdamW, lr 1e-4, weight decay 0.05', 'all detectors', DETECTION,
         'optim_wrapper.optimizer.{type,lr,betas,weight_decay}',
         dict(type='AdamW', lr=1e-4, betas=[0.9, 0.999], weight_decay=0.05),
         'yaml SOLVER; train_net.py build_optimizer'),
    Item('No weight decay on normalization layers, found by module type (BatchNorm, '
         'LayerNorm, ...); biases decay like weights', 'v1 RetinaNet, Mask R-CNN',
         DETECTION_V1, 'optim_wrapper.paramwise_cfg', dict(norm_decay_mult=0.0),
         'detectron2 get_default_optimizer_params, WEIGHT_DECAY_NORM 0 (WEIGHT_DECAY_BIAS '
         'None since detectron2 0.6; before, biases got 1e-4)'),
    Item('No weight decay on normalization layers found by type, except the ResTv2 output '
         'norms (the authors\' own LayerNorm class, which detectron2 does not know)',
         'ResTv2 detectors', DETECTION_V2, 'optim_wrapper.paramwise_cfg',
         dict(norm_decay_mult=0.0, custom_keys=V2_OUTPUT_NORMS_DECAY),
         'detectron2 get_default_optimizer_params; restv2/restv2.py norm_i = LayerNorm '
         '(utils) in a Sequential'),
    Item('Gradient clipping of the whole model to L2 norm 0.01', 'Mask R-CNN', MASK_RCNN,
         'optim_wrapper.clip_grad', dict(max_norm=0.01, norm_type=2),
         'Base-RCNN-FPN.yaml CLIP_GRADIENTS (full_model); train_net.py'),
    Item('No gradient clipping', 'RetinaNet', RETINANET, 'optim_wrapper.clip_grad', None,
         'Base-RetinaNet.yaml (CLIP_GRADIENTS off by default)'),
    Item('Mixed precision', 'ResTv2 detectors', DETECTION_V2, 'optim_wrapper.type',
         'AmpOptimWrapper', 'ResTv2 yaml SOLVER.AMP'),
    Item('Full precision', 'v1 RetinaNet, Mask R-CNN', DETECTION_V1, 'optim_wrapper.type',
         'OptimWrapper', 'detectron2 SOLVER.AMP off by default'),
    Item('16 images per iteration (2 per GPU x 8 GPUs)', 'all detectors', DETECTION,
         '{train_dataloader.batch_size,auto_scale_lr.base_batch_size}',
         {'train_dataloader.batch_size': 2, 'auto_scale_lr.base_batch_size': 16},
         'yaml IMS_PER_BATCH 16'),
    Item('90k iterations, evaluated at the end', 'v1 RetinaNet, Mask R-CNN', DETECTION_V1,
         'train_cfg.{type,max_iters,val_interval}',
         dict(type='IterBasedTrainLoop', max_iters=90000, val_interval=90000),
         'Base yaml MAX_ITER; detectron2 EVAL_PERIOD 0'),
    Item('270k iterations, evaluated every 20k', 'Mask R-CNN ResTv2 3x', MASK_RCNN_V2,
         'train_cfg.{type,max_iters,val_interval}',
         dict(type='IterBasedTrainLoop', max_iters=270000, val_interval=20000),
         'ResTv2 yaml MAX_ITER, EVAL_PERIOD'),
    Item('270k iterations, evaluated every 30k', 'RetinaNet ResTv2-T 3x', RETINANET_V2,
         'train_cfg.{type,max_iters,val_interval}',
         dict(type='IterBasedTrainLoop', max_iters=270000, val_interval=30000),
         'retinanet_restv2_tiny_FPN_3x.yaml MAX_ITER, EVAL_PERIOD'),
    Item('Warm-up: 1000 iterations, linear from 0.001', 'all detectors', DETECTION,
         'param_scheduler.0.{type,start_factor,begin,end,by_epoch}',
         dict(type='LinearLR', start_factor=0.001, begin=0, end=1001, by_epoch=False),
         'detectron2 WARMUP_ITERS, WARMUP_FACTOR, WARMUP_METHOD'),
    Item('Learning rate x0.1 at 60k and 80k', 'v1 RetinaNet, Mask R-CNN', DETECTION_V1,
         'param_scheduler.1.{type,milestones,gamma,by_epoch}',
         dict(type='MultiStepLR', milestones=[60000, 80000], gamma=0.1, by_epoch=False),
         'Base yaml STEPS; detectron2 GAMMA'),
    Item('Learning rate x0.1 at 210k and 250k', 'ResTv2 detectors 3x', DETECTION_V2,
         'param_scheduler.1.{type,milestones,gamma,by_epoch}',
         dict(type='MultiStepLR', milestones=[210000, 250000], gamma=0.1, by_epoch=False),
         'ResTv2 yaml STEPS; detectron2 GAMMA'),
    # --- segmentation ----------------------------------------------------------------
    Item('Stochastic depth', 'UperNet ResTv2-T', _both('tiny'), 'model.backbone.drop_path_rate',
         0.1, 'upernet_restv2_tiny_512_160k_ade20k.py'),
    Item('Stochastic depth', 'UperNet ResTv2-S', _both('small'), 'model.backbone.drop_path_rate',
         0.2, 'upernet_restv2_small_512_160k_ade20k.py'),
    Item('Stochastic depth', 'UperNet ResTv2-B', _both('base'), 'model.backbone.drop_path_rate',
         0.3, 'upernet_restv2_base_512_160k_ade20k.py'),
    Item('UperNet head (512 channels, pool scales 1-6, dropout 0.1, SyncBN)',
         'UperNet ResTv2', UPERNET_ALL,
         'model.decode_head.{channels,pool_scales,dropout_ratio,norm_cfg}',
         dict(channels=512, pool_scales=[1, 2, 3, 6], dropout_ratio=0.1,
              norm_cfg=dict(type='SyncBN', requires_grad=True)),
         '_base_/models/upernet_restv2.py'),
    Item('Auxiliary FCN head on stage 3 (256 channels, loss weight 0.4)', 'UperNet ResTv2',
         UPERNET_ALL,
         'model.auxiliary_head.{in_index,channels,num_convs,concat_input,dropout_ratio}',
         dict(in_index=2, channels=256, num_convs=1, concat_input=False, dropout_ratio=0.1),
         '_base_/models/upernet_restv2.py'),
    Item('AdamW, lr 6e-5, weight decay 0.01', 'UperNet ResTv2-T', _both('tiny'),
         'optim_wrapper.optimizer.{type,lr,betas,weight_decay}',
         dict(type='AdamW', lr=6e-5, betas=[0.9, 0.999], weight_decay=0.01),
         'upernet_restv2_tiny_512_160k_ade20k.py'),
    Item('AdamW, lr 1.5e-4, weight decay 0.05, with a `LearningRateDecayOptimizerConstructor` '
         '(stage-wise lr decay 0.9, num_layers = the stage depths)', 'UperNet ResTv2-S, -B',
         _both('small') + _both('base'), 'optim_wrapper.optimizer.{type,lr,betas,weight_decay}',
         dict(type='AdamW', lr=1.5e-4, betas=[0.9, 0.999], weight_decay=0.05),
         'upernet_restv2_{small,base}_512_160k_ade20k.py',
         ours=dict(type='AdamW', lr=6e-5, betas=[0.9, 0.999], weight_decay=0.01),
         why='the ResTv2-T optimizer: the constructor is in neither the authors\' repository '
             'nor mmseg (ConvNeXt\'s adds 2 to num_layers and fails on their tuple; mmseg '
             '1.x\'s takes ConvNeXt only), so its per-stage rates and decay rule are unknown'),
    Item('No weight decay on parameters whose name contains \'norm\' (the stem\'s and the '
         'heads\' BatchNorms do decay)', 'UperNet ResTv2', UPERNET_ALL,
         'optim_wrapper.paramwise_cfg', SWIN_PARAMWISE,
         'upernet_restv2_tiny_512_160k_ade20k.py custom_keys'),
    Item('16 images per iteration, 512 x 512 crops', 'UperNet ResTv2', UPERNET_ALL,
         '{train_dataloader.batch_size,crop_size}',
         {'train_dataloader.batch_size': 2, 'crop_size': [512, 512]},
         'configs: samples_per_gpu 2 (8 GPUs), crop_size'),
    Item('160k iterations', 'UperNet ResTv2', UPERNET_ALL, 'train_cfg.{type,max_iters}',
         dict(type='IterBasedTrainLoop', max_iters=160000), 'mmseg 0.x schedule_160k.py'),
    Item('Warm-up: 1500 iterations, linear from 1e-6', 'UperNet ResTv2', UPERNET_ALL,
         'param_scheduler.0.{type,start_factor,begin,end,by_epoch}',
         dict(type='LinearLR', start_factor=1e-6, begin=0, end=1501, by_epoch=False),
         'configs lr_config warmup'),
    Item('Poly decay (power 1, to 0) over all 160k iterations, times the warm-up',
         'UperNet ResTv2', UPERNET_ALL, 'param_scheduler.1.{type,power,eta_min,begin,end}',
         dict(type='PolyLR', power=1.0, eta_min=0.0, begin=0, end=160001),
         'configs lr_config poly; mmcv 1.x PolyLrUpdaterHook with warm-up'),
    Item('Whole-image inference', 'UperNet ResTv2', UPERNET_ALL, 'model.test_cfg.mode',
         'whole', '_base_/models/upernet_restv2.py'),
    Item('Test resize: into (2048, 512) keeping the aspect ratio, then to multiples of 32',
         'UperNet ResTv2', list(UPERNET.values()), 'test_dataloader.dataset.pipeline.1',
         dict(type='AlignResize', scale=[2048, 512], size_divisor=32),
         'tools/align_resize.py (their backbone needs multiples of 32)',
         ours=dict(type='Resize', scale=[2048, 512], keep_ratio=True),
         why='natural size (e.g. 512 x 683): ours takes any size; the `*_align32` configs '
             'resize as the authors did'),
    Item('Test resize: into (2048, 512) keeping the aspect ratio, then to multiples of 32',
         'UperNet ResTv2 `*_align32`', list(UPERNET_ALIGN32.values()),
         'test_dataloader.dataset.pipeline.1',
         dict(type='AlignResize', scale=[2048, 512], size_divisor=32),
         'tools/align_resize.py'),
    Item('Multi-scale + flip test (`--tta`): the test scale times 0.5 ... 1.75, softmax '
         'averaged', 'UperNet ResTv2', UPERNET_ALL,
         '{tta_model.type,tta_pipeline.1.transforms.0.*.scale,tta_pipeline.1.transforms.1.*.prob}',
         {'tta_model.type': 'SegTTAModel',
          'tta_pipeline.1.transforms.0.*.scale': [[int(2048 * r), int(512 * r)]
                                                  for r in TTA_RATIOS],
          'tta_pipeline.1.transforms.1.*.prob': [0.0, 1.0]},
         'README --aug-test; mmseg 0.x MultiScaleFlipAug img_ratios, EncoderDecoder.aug_test'),
    Item('Multi-scale test resize', 'UperNet ResTv2', list(UPERNET.values()),
         'tta_pipeline.1.transforms.0.*.type', ['AlignResize'] * len(TTA_RATIOS),
         'tools/align_resize.py', ours=['Resize'] * len(TTA_RATIOS),
         why='natural size, as the single-scale test; the `*_align32` configs use AlignResize'),
    Item('Multi-scale test resize', 'UperNet ResTv2 `*_align32`', list(UPERNET_ALIGN32.values()),
         'tta_pipeline.1.transforms.0.*.type', ['AlignResize'] * len(TTA_RATIOS),
         'tools/align_resize.py'),
]

_MISSING = object()


def _plain(value):
    """Config values as plain lists and dicts (tuples and ConfigDicts compare as such)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve(node, key: str):
    """The value at ``key`` (see :class:`Item`) in a config; None where a key is missing."""
    if key.startswith('{') and key.endswith('}') and key.count('{') == 1:
        # a dict of whole keys, e.g. {train_dataloader.batch_size,crop_size}
        return {k: resolve(node, k) for k in key[1:-1].split(',')}
    parts = re.findall(r'\{[^}]*\}|[^.]+', key)
    for i, part in enumerate(parts):
        if node is None:
            return None
        if part.startswith('{'):
            return {k: _plain(node.get(k)) for k in part[1:-1].split(',')}
        if part == '*':
            rest = '.'.join(parts[i + 1:])
            return [resolve(element, rest) if rest else _plain(element) for element in node]
        selector = re.fullmatch(r'(\w+)\[(\w+)\]', part)
        if selector:
            matches = [t for t in node.get(selector[1], []) if t.get('type') == selector[2]]
            assert len(matches) == 1, f'{key}: {len(matches)} elements of type {selector[2]}'
            node = matches[0]
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        else:
            node = node.get(part)
    return _plain(node)


def _value_text(value, nested: bool = False) -> str:
    """A value for the README: ``k=v, ...`` at the top, ``{k: v}`` inside, no quotes."""
    if isinstance(value, dict):
        items = [f'{k}: {_value_text(v, True)}' if nested else f'{k}={_value_text(v, True)}'
                 for k, v in value.items()]
        return '{' + ', '.join(items) + '}' if nested else ', '.join(items)
    if isinstance(value, list):
        return '[' + ', '.join(_value_text(v, True) for v in value) + ']'
    if isinstance(value, float):
        return f'{value:g}'
    return str(value)


def readme_table() -> list:
    """The README's recipe table, one line per row of RECIPE."""
    lines = ['| recipe item | authors | this repo |', '|---|---|---|']
    for row in RECIPE:
        ours = ('same' if row.ours is SAME else
                f'**differs**: {_value_text(row.ours)}; {row.why}')
        lines.append(f'| {row.item} ({row.configs}) | `{row.key}`: {_value_text(row.authors)} '
                     f'({row.source}) | {ours} |')
    return lines


def _cases():
    for index, row in enumerate(RECIPE):
        for path in row.paths:
            yield pytest.param(index, path, id=f'{index}-{Path(path).stem}')


_CONFIGS = {}


def load(path: str) -> Config:
    if path not in _CONFIGS:
        _CONFIGS[path] = Config.fromfile(CONFIG_DIR / path)
    return _CONFIGS[path]


@pytest.mark.parametrize('index,path', list(_cases()))
def test_config_follows_the_recipe(index, path):
    row = RECIPE[index]
    expected = row.authors if row.ours is SAME else row.ours
    assert resolve(load(path), row.key) == _plain(expected), f'{row.item}: {path}'


def test_rows_that_differ_say_why_and_rows_that_match_do_not():
    for row in RECIPE:
        assert bool(row.why) == (row.ours is not SAME), row.item
        assert row.ours is SAME or _plain(row.ours) != _plain(row.authors), row.item


def test_every_released_recipe_config_is_in_the_table():
    covered = {path for row in RECIPE for path in row.paths}
    shipped = {str(p.relative_to(CONFIG_DIR)) for sub in ('detection', 'segmentation')
               for p in (CONFIG_DIR / sub).glob('*.py')}
    # The ResT v1 UperNets have no recipe of the authors' (they released none).
    without_recipe = {'segmentation/upernet_rest_small_ade20k.py',
                      'segmentation/upernet_rest_base_ade20k.py'}
    assert covered == shipped - without_recipe


def test_readme_configs_section_lists_the_recipe_table():
    readme = (REPO / 'README.md').read_text()
    section = readme.split('\n## Configs\n', 1)[1].split('\n## ', 1)[0]
    table = [line for line in section.splitlines() if line.startswith('| recipe item')]
    assert table, 'README "## Configs" has no recipe table'
    start = section.splitlines().index(table[0])
    lines = section.splitlines()[start:start + len(RECIPE) + 2]
    assert lines == readme_table()


# --- behaviour behind the values -------------------------------------------------------
def _build(cfg: Config):
    import importlib

    from mmengine.model import revert_sync_batchnorm
    scope = cfg.default_scope
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope(scope):
        model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    return revert_sync_batchnorm(model)


def _weight_decays(cfg: Config, model) -> dict:
    from mmengine.optim import build_optim_wrapper
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU; the groups are the same
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        optim_wrapper = build_optim_wrapper(model, optim_cfg)
    by_id = {id(p): group['weight_decay'] for group in optim_wrapper.param_groups
             for p in group['params']}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


# detectron2's get_default_optimizer_params: these module types get WEIGHT_DECAY_NORM.
D2_NORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                 torch.nn.SyncBatchNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm1d,
                 torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
                 torch.nn.LocalResponseNorm)


@pytest.mark.parametrize('path', ['detection/retinanet_rest_small_coco.py',
                                  'detection/mask_rcnn_rest_small_coco.py',
                                  'detection/mask_rcnn_restv2_tiny_3x_coco.py'])
def test_weight_decay_as_detectron2_gave_it(path):
    """detectron2 exempts the parameters of modules of its norm types; the authors' model
    has our module types except the ResTv2 output norms, a class of theirs (so decayed)."""
    cfg = load(path).copy()
    model = _build(cfg)
    decays = _weight_decays(cfg, model)
    v2 = cfg.model.backbone.type == 'ResTV2'
    expected = {}
    for module_name, module in model.named_modules():
        authors_class_is_norm = isinstance(module, D2_NORM_TYPES) and not (
            v2 and re.fullmatch(r'backbone\.norm\d', module_name))
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                expected[f'{module_name}.{name}'] = 0.0 if authors_class_is_norm else 0.05
    assert decays == expected
    assert v2 == any(d == 0.05 for n, d in decays.items() if n.startswith('backbone.norm'))


def test_weight_decay_as_mmseg0x_gave_it_to_the_authors_names(reference_dir):
    """mmseg 0.x's custom key 'norm' exempts the parameters whose name, in the authors'
    model, contains 'norm': translate our backbone's names back to theirs."""
    import json

    from rest_mm.checkpoint import convert_checkpoint
    keys = json.loads((reference_dir / 'reference_checkpoint_keys.json').read_text())
    authors_keys = [k for k in keys['restv2_tiny'] if not k.startswith(('head.', 'norm.'))]
    authors_keys += [f'norm_{i}.{p}' for i in range(1, 5) for p in ('weight', 'bias')]
    tensors = {k: torch.zeros(1) for k in authors_keys}
    ours_to_authors = {ours: authors_keys[[id(t) for t in tensors.values()].index(id(v))]
                       for ours, v in convert_checkpoint(tensors).items()}

    cfg = load(UPERNET['tiny']).copy()
    model = _build(cfg)
    decays = _weight_decays(cfg, model)
    stem_bn_checked = False
    for name, decay in decays.items():
        authors_name = (ours_to_authors[name[len('backbone.'):]] if name.startswith('backbone.')
                        else name)  # mmseg 0.x's heads have the same names (test_mmseg0x.py)
        assert decay == (0.0 if 'norm' in authors_name else 0.01), (name, authors_name)
        stem_bn_checked |= authors_name == 'stem.proj.1.weight' and decay == 0.01
    assert stem_bn_checked


def _lr_curve(param_scheduler: list, iterations: int) -> np.ndarray:
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    wrapper = OptimWrapper(optimizer)
    schedulers = [PARAM_SCHEDULERS.build(dict(cfg, optimizer=wrapper)) for cfg in param_scheduler]
    lrs = np.empty(iterations)
    group = optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # no optimizer.step() between the scheduler steps
        for i in range(iterations):
            lrs[i] = group['lr']
            for scheduler in schedulers:
                scheduler.step()
    return lrs


def test_detection_learning_rate_is_detectron2s_warmup_multistep():
    """detectron2's WarmupMultiStepLR: base x warm-up factor (linear from WARMUP_FACTOR 0.001
    over WARMUP_ITERS 1000) x GAMMA ** (steps passed), iteration by iteration."""
    end = 90000
    t = np.arange(end)
    alpha = np.minimum(t / 1000, 1.0)
    expected = (0.001 * (1 - alpha) + alpha) * 0.1 ** ((t >= 60000).astype(int) + (t >= 80000))
    schedule = load('detection/mask_rcnn_rest_small_coco.py').param_scheduler
    np.testing.assert_allclose(_lr_curve(schedule, end), expected, rtol=1e-6)


def test_segmentation_learning_rate_is_mmcv1s_poly_with_warmup():
    """mmcv 1.x's poly schedule with linear warm-up: base x (1 - t / 160000) ** 1, times
    (1 - (1 - t / 1500) (1 - 1e-6)) during the warm-up, iteration by iteration."""
    end = 160000
    t = np.arange(end)
    warm = np.where(t < 1500, 1 - (1 - t / 1500) * (1 - 1e-6), 1.0)
    expected = (1 - t / end) * warm
    schedule = load(UPERNET['tiny']).param_scheduler
    np.testing.assert_allclose(_lr_curve(schedule, end), expected, rtol=1e-5, atol=1e-12)


def test_align32_config_segments_at_multiples_of_32():
    """Through the config's own test pipeline: a 512x683 image reaches the model as
    512x704 (natural-size config: 512x683)."""
    from mmengine.dataset import Compose
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    for path, width in ((UPERNET_ALIGN32['tiny'], 704), (UPERNET['tiny'], 683)):
        cfg = load(path)
        with DefaultScope.overwrite_default_scope('mmseg'):
            import rest_mm.transforms  # noqa: F401  (what the align32 configs import)
            pipeline = Compose([t for t in cfg.test_dataloader.dataset.pipeline
                                if t.type not in ('LoadImageFromFile', 'LoadAnnotations')])
            image = np.zeros((512, 683, 3), dtype=np.uint8)
            packed = pipeline(dict(img=image, img_shape=image.shape[:2],
                                   ori_shape=image.shape[:2]))
        assert tuple(packed['inputs'].shape) == (3, 512, width), path
