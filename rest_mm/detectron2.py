"""The authors' detectron2 detectors as mmdet 3.x checkpoints.

The authors released their COCO detectors (RetinaNet ResT-S/B, Mask R-CNN ResT-S/B and
ResTv2-T/S/B 3x) as detectron2 checkpoints. :func:`convert_detectron2_detector` maps every
key of such a state dict to the mmdet model our matching config builds, and reproduces
detectron2's semantics where the libraries differ in layout:

* **Anchor order.** detectron2 orders a location's anchors size-major
  (``DefaultAnchorGenerator.generate_cell_anchors``), mmdet ratio-major
  (``AnchorGenerator.gen_single_level_base_anchors``). RetinaNet has three sizes per level,
  so the output channels of its classifier (``A * K``, channel ``a * K + k`` in both
  libraries) and regressor (``A * 4``) are permuted: the converted head scores exactly the
  boxes detectron2 scores. The RPN has one size per level: both orders agree.
* **Buffers** are checked, not dropped: the cell anchors that older detectron2 versions
  save must equal mmdet's anchors of the matching config (reordered); ``pixel_mean`` and
  ``pixel_std`` (also absent from newer checkpoints) go into the meta, and
  :func:`check_preprocessing` refuses a config whose ``data_preprocessor`` disagrees.
* **Test settings.** :data:`DETECTRON2_TEST_CFG` and :data:`DETECTRON2_TEST_INPUT` hold
  detectron2's evaluation defaults, which the detection configs must equal (tested).

Box coding, FPN top blocks, RoI-to-level assignment and resizing agree given our configs:
``tests/test_detectron2.py`` compares them with a re-derivation of detectron2's code; the
README ("Evaluate the authors' released models") lists what is left.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from .checkpoint import (
    as_tensors,
    backbone_key_problems,
    convert_checkpoint,
    describe_weights,
    is_v1,
    weights_preset,
)
from .rest import BACKBONES

# ---------------------------------------------------------------------------------------
# Facts: detectron2 -> mmdet key names, anchors, configs, evaluation defaults.
# ---------------------------------------------------------------------------------------
_PARAMS = ('weight', 'bias')
_RETINANET_CONVS = 4  # MODEL.RETINANET.NUM_CONVS
_MASK_CONVS = 4  # Base-RCNN-FPN.yaml ROI_MASK_HEAD.NUM_CONV

# Module prefixes, detectron2 -> mmdet, after the FPN (whose names depend on its levels).
_HEAD_PREFIXES = {
    'RetinaNet': {
        **{f'head.cls_subnet.{2 * i}.': f'bbox_head.cls_convs.{i}.conv.'
           for i in range(_RETINANET_CONVS)},  # Sequential(conv, ReLU, conv, ReLU, ...)
        **{f'head.bbox_subnet.{2 * i}.': f'bbox_head.reg_convs.{i}.conv.'
           for i in range(_RETINANET_CONVS)},
        'head.cls_score.': 'bbox_head.retina_cls.',
        'head.bbox_pred.': 'bbox_head.retina_reg.',
    },
    'MaskRCNN': {
        'proposal_generator.rpn_head.conv.': 'rpn_head.rpn_conv.',
        'proposal_generator.rpn_head.objectness_logits.': 'rpn_head.rpn_cls.',
        'proposal_generator.rpn_head.anchor_deltas.': 'rpn_head.rpn_reg.',
        'roi_heads.box_head.fc1.': 'roi_head.bbox_head.shared_fcs.0.',
        'roi_heads.box_head.fc2.': 'roi_head.bbox_head.shared_fcs.1.',
        'roi_heads.box_predictor.cls_score.': 'roi_head.bbox_head.fc_cls.',
        'roi_heads.box_predictor.bbox_pred.': 'roi_head.bbox_head.fc_reg.',
        **{f'roi_heads.mask_head.mask_fcn{i + 1}.': f'roi_head.mask_head.convs.{i}.conv.'
           for i in range(_MASK_CONVS)},
        'roi_heads.mask_head.deconv.': 'roi_head.mask_head.upsample.',
        'roi_heads.mask_head.predictor.': 'roi_head.mask_head.conv_logits.',
    },
}

# Per architecture: the first FPN stage (log2 of its stride: RetinaNet's FPN starts at P3
# from stage 2, Mask R-CNN's at P2 from stage 1), detectron2's top block (P6/P7 convs on
# C5 for RetinaNet, parameter-free max pooling for Mask R-CNN), where detectron2 keeps
# cell anchors, and the anchor generator of the matching mmdet config.
ARCHITECTURES = {
    'RetinaNet': dict(
        first_fpn_stage=3,
        top_block=('p6', 'p7'),
        cell_anchors='anchor_generator.cell_anchors.',
        # Base-RetinaNet.yaml SIZES [[x, x * 2**(1/3), x * 2**(2/3)] for x in 32..512],
        # ASPECT_RATIOS [0.5, 1, 2], OFFSET 0.0; mmdet: 4 * stride * 2**(k/3), centre 0.
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                              scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                              strides=[8, 16, 32, 64, 128]),
        # Output convs whose channels are per anchor (size-major in detectron2).
        anchor_major_outputs=('bbox_head.retina_cls.', 'bbox_head.retina_reg.')),
    'MaskRCNN': dict(
        first_fpn_stage=2,
        top_block=(),
        cell_anchors='proposal_generator.anchor_generator.cell_anchors.',
        # Base-RCNN-FPN.yaml SIZES [[32], [64], [128], [256], [512]], ratios [0.5, 1, 2].
        anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        anchor_major_outputs=('rpn_head.rpn_cls.', 'rpn_head.rpn_reg.')),
}

# (architecture, backbone) -> the config that trains and evaluates it.
CONFIGS = {
    ('RetinaNet', 'rest_lite'): 'configs/detection/retinanet_rest_lite_coco.py',
    ('RetinaNet', 'rest_small'): 'configs/detection/retinanet_rest_small_coco.py',
    ('RetinaNet', 'rest_base'): 'configs/detection/retinanet_rest_base_coco.py',
    ('RetinaNet', 'rest_large'): 'configs/detection/retinanet_rest_large_coco.py',
    ('RetinaNet', 'restv2_tiny'): 'configs/detection/retinanet_restv2_tiny_3x_coco.py',
    ('MaskRCNN', 'rest_lite'): 'configs/detection/mask_rcnn_rest_lite_coco.py',
    ('MaskRCNN', 'rest_small'): 'configs/detection/mask_rcnn_rest_small_coco.py',
    ('MaskRCNN', 'rest_base'): 'configs/detection/mask_rcnn_rest_base_coco.py',
    ('MaskRCNN', 'rest_large'): 'configs/detection/mask_rcnn_rest_large_coco.py',
    ('MaskRCNN', 'restv2_tiny'): 'configs/detection/mask_rcnn_restv2_tiny_3x_coco.py',
    ('MaskRCNN', 'restv2_small'): 'configs/detection/mask_rcnn_restv2_small_3x_coco.py',
    ('MaskRCNN', 'restv2_base'): 'configs/detection/mask_rcnn_restv2_base_3x_coco.py',
}

# The input the authors' detectors were trained and evaluated with. v1: detectron2's
# default (MODEL.PIXEL_MEAN / PIXEL_STD, INPUT.FORMAT "BGR"; no v1 yaml changes them).
# v2: the yamls' PIXEL_MEAN / PIXEL_STD and INPUT.FORMAT "RGB".
INPUT_FORMATS = {
    'ResT': dict(format='BGR', mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0]),
    'ResTV2': dict(format='RGB', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
}

# detectron2's evaluation settings, as mmdet test_cfg entries (names in config/defaults.py
# unless a yaml is named).
DETECTRON2_TEST_CFG = {
    'RetinaNet': dict(
        nms_pre=1000,  # MODEL.RETINANET.TOPK_CANDIDATES_TEST, per level, after the threshold
        min_bbox_size=0,  # detector_postprocess drops empty boxes (mmdet: before NMS)
        score_thr=0.05,  # MODEL.RETINANET.SCORE_THRESH_TEST
        nms=dict(type='nms', iou_threshold=0.5),  # MODEL.RETINANET.NMS_THRESH_TEST, per class
        max_per_img=100),  # TEST.DETECTIONS_PER_IMAGE
    'MaskRCNN': dict(
        rpn=dict(
            nms_pre=1000,  # Base-RCNN-FPN.yaml RPN.PRE_NMS_TOPK_TEST, per level
            max_per_img=1000,  # Base-RCNN-FPN.yaml RPN.POST_NMS_TOPK_TEST, per image
            nms=dict(type='nms', iou_threshold=0.7),  # MODEL.RPN.NMS_THRESH, per level
            min_bbox_size=0),  # MODEL.PROPOSAL_GENERATOR.MIN_SIZE
        rcnn=dict(
            score_thr=0.05,  # MODEL.ROI_HEADS.SCORE_THRESH_TEST
            nms=dict(type='nms', iou_threshold=0.5),  # MODEL.ROI_HEADS.NMS_THRESH_TEST
            max_per_img=100,  # TEST.DETECTIONS_PER_IMAGE
            mask_thr_binary=0.5)),  # detector_postprocess(mask_threshold=0.5)
}
DETECTRON2_TEST_INPUT = dict(
    scale=(1333, 800),  # INPUT.MAX_SIZE_TEST, INPUT.MIN_SIZE_TEST (ResizeShortestEdge)
    keep_ratio=True,
    pad_size_divisor=32,  # FPN.size_divisibility: the stride of its last input (stage 4)
    # detectron2 decodes with PIL (data/detection_utils.py read_image) and resizes uint8
    # images with PIL's bilinear filter (data/transforms/transform.py ResizeTransform).
    imdecode_backend='pillow',
    resize_backend='pillow',
    interpolation='bilinear')

_PIXEL_BUFFERS = ('pixel_mean', 'pixel_std')


# ---------------------------------------------------------------------------------------
# The converter.
# ---------------------------------------------------------------------------------------
def _state_dict_of(checkpoint: Mapping) -> Mapping:
    """The state dict of a detectron2 file (``{"model": ...}``) or the state dict itself."""
    inner = checkpoint.get('model')
    return inner if isinstance(inner, Mapping) else checkpoint


def is_detectron2_detector(state_dict: Mapping) -> bool:
    """Whether this is a whole detectron2 detector (not only its backbone).

    Args:
        state_dict (Mapping): A detectron2 state dict, or a file's ``{"model": ...}``.
    """
    keys = list(_state_dict_of(state_dict))
    return (any(k.startswith('backbone.bottom_up.') for k in keys)
            and any(k.startswith(('head.', 'proposal_generator.', 'roi_heads.')) for k in keys))


def _architecture(keys) -> str:
    if 'head.cls_score.weight' in keys:
        return 'RetinaNet'
    if 'roi_heads.mask_head.predictor.weight' in keys:
        return 'MaskRCNN'
    raise ValueError('unsupported detectron2 detector: expected a RetinaNet '
                     '(head.cls_score) or a Mask R-CNN (roi_heads.mask_head.predictor); '
                     f'found neither among {sorted(k for k in keys if "bottom_up" not in k)[:8]}')


def _backbone_model(backbone: Mapping) -> Tuple[str, str, Tuple[int, ...]]:
    """(``'ResT'``/``'ResTV2'``, preset, output stage indices) of converted backbone weights."""
    model_name, preset = weights_preset(backbone)
    if preset is None:
        _, found = describe_weights(backbone)
        raise ValueError(f'the detectron2 backbone is a {model_name} with embed_dims='
                         f'{found["embed_dims"]} and depths={found["depths"]}, which is no '
                         f'preset')
    out_indices = tuple(sorted({int(m[1]) for k in backbone
                                for m in [re.match(r'norm(\d)\.', k)] if m}))
    return model_name, preset, out_indices


def _check_backbone_keys(backbone: Mapping, origins: Mapping, model_name: str, preset: str,
                         out_indices: Tuple[int, ...]):
    """Every converted backbone key, with its shape, is one the matching model has."""
    extra = dict(norm_in_path=True) if model_name == 'ResT' else {}
    with torch.device('meta'):
        model = BACKBONES[model_name](arch=preset, out_indices=out_indices, **extra)
    unknown, missing, mis_shaped = backbone_key_problems(backbone, model)
    if unknown or missing or mis_shaped:
        raise ValueError(
            f'detectron2 backbone does not fit {model_name}(arch={preset!r}, out_indices='
            f'{out_indices}): unexplained keys {[origins[k] for k in unknown]}, missing (our '
            f'names) {missing}, shape mismatches '
            f'{[f"{origins[k]} {tuple(backbone[k].shape)}" for k in mis_shaped]}')


def _fpn_prefixes(architecture: str, num_levels: int) -> Dict[str, str]:
    """detectron2 FPN names (``fpn_lateral{stage}``) -> mmdet FPN names (index from 0)."""
    first = ARCHITECTURES[architecture]['first_fpn_stage']
    prefixes = {}
    for i in range(num_levels):
        prefixes[f'backbone.fpn_lateral{first + i}.'] = f'neck.lateral_convs.{i}.conv.'
        prefixes[f'backbone.fpn_output{first + i}.'] = f'neck.fpn_convs.{i}.conv.'
    for j, name in enumerate(ARCHITECTURES[architecture]['top_block']):
        prefixes[f'backbone.top_block.{name}.'] = f'neck.fpn_convs.{num_levels + j}.conv.'
    return prefixes


def _mmdet_anchor_generator(architecture: str):
    from mmdet.models.task_modules.prior_generators import AnchorGenerator
    cfg = dict(ARCHITECTURES[architecture]['anchor_generator'])
    cfg.pop('type')
    return AnchorGenerator(**cfg)


def mmdet_to_detectron2_anchor_order(architecture: str) -> List[int]:
    """For each of mmdet's anchors at a location, the index of the same anchor in
    detectron2's order (mmdet: ``ratio * num_sizes + size``; detectron2:
    ``size * num_ratios + ratio``)."""
    generator = _mmdet_anchor_generator(architecture)
    num_sizes, num_ratios = len(generator.scales), len(generator.ratios)
    return [(m % num_sizes) * num_ratios + m // num_sizes
            for m in range(num_sizes * num_ratios)]


def _reorder_anchor_channels(tensor: torch.Tensor, order: List[int]) -> torch.Tensor:
    """Output channels ``a * C + c`` (per anchor ``a``) from detectron2's anchor order."""
    per_anchor = tensor.shape[0] // len(order)
    grouped = tensor.reshape(len(order), per_anchor, *tensor.shape[1:])
    return grouped[order].reshape(tensor.shape)


def _check_cell_anchors(architecture: str, buffers: Dict[str, torch.Tensor]):
    """Saved cell anchors must be mmdet's base anchors of the matching config, reordered."""
    generator = _mmdet_anchor_generator(architecture)
    order = mmdet_to_detectron2_anchor_order(architecture)
    inverse = [order.index(d) for d in range(len(order))]
    prefix = ARCHITECTURES[architecture]['cell_anchors']
    levels = [f'{prefix}{level}' for level in range(len(generator.base_anchors))]
    if buffers and sorted(buffers) != levels:  # a checkpoint saves all of them or none
        raise ValueError(f'detectron2 cell anchors {sorted(buffers)} do not match the '
                         f'{len(levels)} levels of the matching config ({", ".join(levels)})')
    for key, value in buffers.items():
        level = int(key[len(prefix):])
        expected = generator.base_anchors[level][inverse].double()
        if value.shape != expected.shape or not torch.allclose(
                value.double(), expected, rtol=1e-5, atol=1e-3):
            raise ValueError(f'{key} = {value.tolist()} are not the anchors of the matching '
                             f'config ({expected.tolist()} in detectron2\'s order)')


def _pixel_statistics(buffers: Dict[str, torch.Tensor], model_name: str) -> dict:
    facts = INPUT_FORMATS[model_name]
    # The shortest decimals that round to the saved float32 values: 103.53, not 103.5299...
    found = {name: [float(str(np.float32(x))) for x in buffers[name].flatten().tolist()]
             if name in buffers else None for name in _PIXEL_BUFFERS}
    for name, values in found.items():
        if values is not None and len(values) != 3:
            raise ValueError(f'{name} has {len(values)} values; expected 3 (one per channel)')
    source = ('checkpoint buffers' if found['pixel_mean'] is not None else
              f"not in the checkpoint: {model_name}'s detectron2 recipe")
    return dict(pixel_mean=found['pixel_mean'], pixel_std=found['pixel_std'],
                input_format=facts['format'],
                preprocessing=dict(
                    mean=found['pixel_mean'] or list(facts['mean']),
                    std=found['pixel_std'] or list(facts['std']),
                    bgr_to_rgb=facts['format'] == 'RGB',
                    source=source + f"; input format {facts['format']} from {model_name}'s "
                    f'detectron2 recipe'))


def convert_detectron2_detector(
        state_dict: Mapping) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """An mmdet state dict and its description from a detectron2 detector.

    Pure and deterministic: no file IO, the input is not modified.

    Args:
        state_dict (Mapping): The detectron2 state dict (``checkpoint['model']``; the
            whole ``{"model": ...}`` file is accepted too), values tensors or numpy arrays.

    Returns:
        tuple: ``(state_dict, meta)``. ``meta`` is JSON-able: ``source`` ('detectron2'),
        ``architecture`` ('RetinaNet' | 'MaskRCNN'), ``backbone`` (e.g. 'rest_small'),
        ``config`` (the config that evaluates it), ``pixel_mean`` / ``pixel_std`` (the
        checkpoint's buffers, or None when it has none), ``input_format``,
        ``preprocessing`` (what ``model.data_preprocessor`` must say), ``num_classes`` and
        ``checked_buffers``.

    Raises:
        ValueError: naming any key that no rule explains, a backbone that fits no
            preset, or saved anchors that differ from the matching config's.
    """
    state_dict = as_tensors(_state_dict_of(state_dict), 'detectron2 checkpoint')
    architecture = _architecture(state_dict)
    facts = ARCHITECTURES[architecture]

    bottom_up = OrderedDict((k[len('backbone.bottom_up.'):], v) for k, v in state_dict.items()
                            if k.startswith('backbone.bottom_up.'))
    backbone = convert_checkpoint(bottom_up)
    if len(backbone) != len(bottom_up):  # the backbone converter drops classifier keys
        v1 = is_v1(bottom_up)
        dropped = [f'backbone.bottom_up.{k}' for k in bottom_up
                   if k.startswith('head.') or (k.startswith('norm.') and not v1)]
        raise ValueError(f'backbone keys that no rule explains: {", ".join(dropped)}')
    # The backbone converter renames key by key, in order: our name -> detectron2's.
    origins = {ours: f'backbone.bottom_up.{theirs}' for ours, theirs in zip(backbone, bottom_up)}
    model_name, preset, out_indices = _backbone_model(backbone)
    _check_backbone_keys(backbone, origins, model_name, preset, out_indices)
    backbone_name = f"{'rest' if model_name == 'ResT' else 'restv2'}_{preset}"
    if (architecture, backbone_name) not in CONFIGS:
        raise ValueError(f'no config in configs/detection/ for a {architecture} with a '
                         f'{backbone_name} backbone; configs exist for {sorted(CONFIGS)}')

    prefixes = {**_fpn_prefixes(architecture, len(out_indices)), **_HEAD_PREFIXES[architecture]}
    converted = OrderedDict(('backbone.' + k, v) for k, v in backbone.items())
    pixel_buffers, cell_anchors, unexplained = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith('backbone.bottom_up.'):
            continue
        if key in _PIXEL_BUFFERS:
            pixel_buffers[key] = value
            continue
        if key.startswith(facts['cell_anchors']) and key[len(facts['cell_anchors']):].isdigit():
            cell_anchors[key] = value
            continue
        prefix, _, param = key.rpartition('.')
        target = prefixes.get(prefix + '.')
        if target is None or param not in _PARAMS:
            unexplained.append(key)
            continue
        converted[target + param] = value
    if unexplained:
        raise ValueError(f'detectron2 {architecture} keys that no rule explains: '
                         f'{", ".join(unexplained)}')
    missing = [f'{p}{param}' for p in prefixes for param in _PARAMS
               if f'{p}{param}' not in state_dict]
    if missing:
        raise ValueError(f'detectron2 {architecture} checkpoint lacks {", ".join(missing)}')

    order = mmdet_to_detectron2_anchor_order(architecture)
    for prefix in facts['anchor_major_outputs']:
        for param in _PARAMS:
            converted[prefix + param] = _reorder_anchor_channels(converted[prefix + param], order)
    _check_cell_anchors(architecture, cell_anchors)

    num_outputs = converted[facts['anchor_major_outputs'][0] + 'weight'].shape[0]
    num_classes = (num_outputs // len(order) if architecture == 'RetinaNet' else
                   converted['roi_head.bbox_head.fc_cls.weight'].shape[0] - 1)
    meta = dict(source='detectron2', architecture=architecture, backbone=backbone_name,
                config=CONFIGS[(architecture, backbone_name)], num_classes=num_classes,
                **_pixel_statistics(pixel_buffers, model_name),
                checked_buffers=sorted(pixel_buffers) + sorted(cell_anchors))
    return converted, meta


# ---------------------------------------------------------------------------------------
# Evaluating a converted checkpoint.
# ---------------------------------------------------------------------------------------
def check_preprocessing(cfg, meta: Mapping):
    """Refuse a config whose input differs from the one the detector was trained with.

    Args:
        cfg (Config | dict): The config about to evaluate the checkpoint.
        meta (Mapping): The converted checkpoint's meta (``source == 'detectron2'``).

    Raises:
        ValueError: naming the config that fits, when ``model.data_preprocessor``'s
            ``mean``, ``std`` or ``bgr_to_rgb`` disagree with the checkpoint.
    """
    if meta.get('source') != 'detectron2':
        raise ValueError(f"check_preprocessing needs a detectron2 checkpoint's meta, got "
                         f"source={meta.get('source')!r}")
    expected = meta['preprocessing']
    preprocessor = cfg['model'].get('data_preprocessor') or {}
    found = dict(mean=preprocessor.get('mean'), std=preprocessor.get('std'),
                 bgr_to_rgb=bool(preprocessor.get('bgr_to_rgb', False)))
    if (found['mean'] is None or found['std'] is None
            or not np.allclose(found['mean'], expected['mean'], rtol=0, atol=1e-3)
            or not np.allclose(found['std'], expected['std'], rtol=0, atol=1e-3)
            or found['bgr_to_rgb'] != expected['bgr_to_rgb']):
        fmt = 'RGB' if expected['bgr_to_rgb'] else 'BGR'
        raise ValueError(
            f"this {meta['architecture']} {meta['backbone']} (converted from detectron2) "
            f"expects {fmt} input normalised with mean {expected['mean']} and std "
            f"{expected['std']} (bgr_to_rgb={expected['bgr_to_rgb']}; {expected['source']}), "
            f"but the config's model.data_preprocessor has mean {found['mean']}, std "
            f"{found['std']}, bgr_to_rgb={found['bgr_to_rgb']}: evaluate it with "
            f"{meta['config']}")
