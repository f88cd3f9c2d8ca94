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
  :func:`rest_mm.cli.checkpoint_checks.check_preprocessing` refuses a config whose
  ``data_preprocessor`` disagrees.
* **Test settings.** The detection configs evaluate with detectron2's defaults (tested
  against ``tests/reference_detectron2.py``).

Box coding, FPN top blocks, RoI-to-level assignment and resizing agree given our configs:
``tests/test_weights_detectron2.py`` compares them with a re-derivation of detectron2's code; the
README ("Evaluate the authors' released models") lists what is left.
"""
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from .. import presets
from .backbone import convert_model_backbone, output_norm_indices
from .state_dicts import as_tensors, unwrap_checkpoint

# ---------------------------------------------------------------------------------------
# Facts: detectron2 -> mmdet key names, anchors, configs, input formats.
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

# (architecture, backbone) -> the config that trains and evaluates it (v2's: 3x schedule).
CONFIGS = {
    (architecture, backbone): f'configs/detection/{stem}_{backbone}'
                              f'{"_3x" if backbone.startswith("restv2_") else ""}_coco.py'
    for architecture, stem, backbones in (
        ('RetinaNet', 'retinanet', ('rest_lite', 'rest_small', 'rest_base', 'rest_large',
                                    'restv2_tiny')),
        ('MaskRCNN', 'mask_rcnn', ('rest_lite', 'rest_small', 'rest_base', 'rest_large',
                                   'restv2_tiny', 'restv2_small', 'restv2_base')))
    for backbone in backbones}

# The input the authors' detectors were trained and evaluated with. v1: detectron2's
# default (MODEL.PIXEL_MEAN / PIXEL_STD, INPUT.FORMAT "BGR"; no v1 yaml changes them).
# v2: the yamls' PIXEL_MEAN / PIXEL_STD and INPUT.FORMAT "RGB".
INPUT_FORMATS = {
    'ResT': dict(format='BGR', mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0]),
    'ResTV2': dict(format='RGB', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
}

_PIXEL_BUFFERS = ('pixel_mean', 'pixel_std')


# ---------------------------------------------------------------------------------------
# The converter.
# ---------------------------------------------------------------------------------------
def is_detectron2_detector(state_dict: Mapping) -> bool:
    """Whether this is a whole detectron2 detector (not only its backbone).

    Args:
        state_dict (Mapping): A detectron2 state dict, or a file's ``{"model": ...}``.
    """
    keys = list(unwrap_checkpoint(state_dict))
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
    state_dict = as_tensors(unwrap_checkpoint(state_dict), 'detectron2 checkpoint')
    architecture = _architecture(state_dict)
    facts = ARCHITECTURES[architecture]

    bottom_up = {k[len('backbone.bottom_up.'):]: v for k, v in state_dict.items()
                 if k.startswith('backbone.bottom_up.')}
    # Imported here: importing rest imports this package.
    from ..rest import BACKBONES
    backbone, model_name, arch = convert_model_backbone(
        bottom_up, 'backbone.bottom_up.', 'detectron2', BACKBONES)
    backbone_name = presets.preset_name(model_name, arch)
    if (architecture, backbone_name) not in CONFIGS:
        raise ValueError(f'no config in configs/detection/ for a {architecture} with a '
                         f'{backbone_name} backbone; configs exist for {sorted(CONFIGS)}')

    num_levels = len(output_norm_indices(backbone))
    prefixes = {**_fpn_prefixes(architecture, num_levels), **_HEAD_PREFIXES[architecture]}
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
