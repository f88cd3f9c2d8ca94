"""The authors' detectron2 detectors in mmdet: conversion, semantics, evaluation settings.

Checkpoints here are synthetic: random weights under exactly the keys detectron2 writes for
RetinaNet ResT-S and Mask R-CNN ResTv2-T (derived from the authors' backbone keys and
detectron2's module names; compared with real detectron2's key dumps in
``tests/data/detectron2/`` when present). The converted models are compared, anchor by
anchor, with ``reference_detectron2`` (plain torch written from detectron2's source).
"""
import json
import math
import subprocess
import sys
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from mmengine.config import Config

import rest_mm  # noqa: F401  (registers the backbones)
from rest_mm.cli.checkpoint_checks import check_preprocessing
from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets
from rest_mm.weights import convert_released
from rest_mm.weights.detectron2 import (
    ARCHITECTURES,
    CONFIGS,
    convert_detectron2_detector,
    is_detectron2_detector,
    mmdet_to_detectron2_anchor_order,
)

import reference_detectron2 as ref
from reference_detectron2 import DETECTRON2_TEST_CFG, DETECTRON2_TEST_INPUT
from testlib import REPO, needs_full_stack

KEY_DUMPS = Path(__file__).parent / 'data' / 'detectron2'
IMAGENET_KEYS = json.loads(
    (Path(__file__).parent / 'data' / 'reference' / 'reference_checkpoint_keys.json').read_text())
FPN_CHANNELS = 256  # MODEL.FPN.OUT_CHANNELS
NUM_CLASSES = 80
# The authors' yamls: v1 uses detectron2's default input, v2 sets its own.
V1_PIXELS = dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0])
V2_PIXELS = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
# float32 unit roundoff: mmdet computes its base anchors in float32.
EPS32 = 2.0 ** -24


# ---------------------------------------------------------------------------------------
# Synthetic detectron2 checkpoints.
# ---------------------------------------------------------------------------------------
def detectron2_layout(architecture: str, backbone: str,
                      buffers: bool = True) -> 'OrderedDict[str, Tuple[int, ...]]':
    """{key: shape} of the state dict detectron2 saves for one of the authors' detectors.

    Backbone: the ImageNet model's keys (the authors' detectron2 backbones use the same
    module names) without the classifier, plus the output norms of their detectron2
    backbones (v1 ``norm{i}`` for output stages 1-3 besides the ImageNet ``norm``; v2
    ``norm_{i}.0``, and no ImageNet ``norm``). The rest from detectron2's modules. With
    ``buffers``, the persistent buffers older detectron2 versions save.
    """
    v1 = backbone.startswith('rest_')
    imagenet = IMAGENET_KEYS[backbone]
    dims = {i: imagenet[f'stage{i}.0.norm1.weight'][0] for i in range(1, 5)}
    stages = (2, 3, 4) if architecture == 'RetinaNet' else (1, 2, 3, 4)
    layout = OrderedDict()

    def conv(name, out_ch, in_ch, k):
        layout[f'{name}.weight'] = (out_ch, in_ch, k, k)
        layout[f'{name}.bias'] = (out_ch,)

    for stage in stages:  # FPN names its convs by log2(stride) = stage + 1
        conv(f'backbone.fpn_lateral{stage + 1}', FPN_CHANNELS, dims[stage], 1)
        conv(f'backbone.fpn_output{stage + 1}', FPN_CHANNELS, FPN_CHANNELS, 3)
    if architecture == 'RetinaNet':  # LastLevelP6P7(in_channels of stage 4)
        conv('backbone.top_block.p6', FPN_CHANNELS, dims[4], 3)
        conv('backbone.top_block.p7', FPN_CHANNELS, FPN_CHANNELS, 3)
    for key, shape in imagenet.items():
        if key.startswith('head.') or (key.startswith('norm.') and not v1):
            continue
        layout[f'backbone.bottom_up.{key}'] = tuple(shape)
    for stage in stages:
        name = (f'norm{stage}' if stage < 4 else None) if v1 else f'norm_{stage}.0'
        if name:
            layout[f'backbone.bottom_up.{name}.weight'] = (dims[stage],)
            layout[f'backbone.bottom_up.{name}.bias'] = (dims[stage],)
    if architecture == 'RetinaNet':
        anchors = 9
        for tower in ('cls_subnet', 'bbox_subnet'):
            for i in range(4):
                conv(f'head.{tower}.{2 * i}', FPN_CHANNELS, FPN_CHANNELS, 3)
        conv('head.cls_score', anchors * NUM_CLASSES, FPN_CHANNELS, 3)
        conv('head.bbox_pred', anchors * 4, FPN_CHANNELS, 3)
        anchor_prefix = 'anchor_generator.cell_anchors'
    else:
        anchors = 3
        conv('proposal_generator.rpn_head.conv', FPN_CHANNELS, FPN_CHANNELS, 3)
        conv('proposal_generator.rpn_head.objectness_logits', anchors, FPN_CHANNELS, 1)
        conv('proposal_generator.rpn_head.anchor_deltas', anchors * 4, FPN_CHANNELS, 1)
        for name, shape in (('box_head.fc1', (1024, FPN_CHANNELS * 7 * 7)),
                            ('box_head.fc2', (1024, 1024)),
                            ('box_predictor.cls_score', (NUM_CLASSES + 1, 1024)),
                            ('box_predictor.bbox_pred', (NUM_CLASSES * 4, 1024))):
            layout[f'roi_heads.{name}.weight'] = shape
            layout[f'roi_heads.{name}.bias'] = shape[:1]
        for i in range(1, 5):
            conv(f'roi_heads.mask_head.mask_fcn{i}', FPN_CHANNELS, FPN_CHANNELS, 3)
        # ConvTranspose2d weights are (in, out, k, k).
        layout['roi_heads.mask_head.deconv.weight'] = (FPN_CHANNELS, FPN_CHANNELS, 2, 2)
        layout['roi_heads.mask_head.deconv.bias'] = (FPN_CHANNELS,)
        conv('roi_heads.mask_head.predictor', NUM_CLASSES, FPN_CHANNELS, 1)
        anchor_prefix = 'proposal_generator.anchor_generator.cell_anchors'
    if buffers:
        layout['pixel_mean'] = (3, 1, 1)
        layout['pixel_std'] = (3, 1, 1)
        for level in range(5):
            layout[f'{anchor_prefix}.{level}'] = (anchors, 4)
    return layout


def synthetic_detectron2(architecture: str, backbone: str, buffers: bool = True,
                         seed: int = 0) -> 'OrderedDict[str, torch.Tensor]':
    """Random weights in ``detectron2_layout``; buffers hold detectron2's real values."""
    generator = torch.Generator().manual_seed(seed)
    pixels = V1_PIXELS if backbone.startswith('rest_') else V2_PIXELS
    sizes = ref.RETINANET_SIZES if architecture == 'RetinaNet' else ref.RPN_SIZES
    state_dict = OrderedDict()
    for key, shape in detectron2_layout(architecture, backbone, buffers).items():
        if key in ('pixel_mean', 'pixel_std'):
            value = torch.tensor(pixels[key.split('_')[1]]).view(shape)
        elif '.cell_anchors.' in key:
            value = ref.cell_anchors(sizes[int(key.rsplit('.', 1)[1])])
        elif key.endswith('num_batches_tracked'):
            value = torch.tensor(7)
        elif key.endswith('running_var'):
            value = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith('.weight') and len(shape) == 1:  # LayerNorm / BatchNorm scales
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith('.weight'):  # unit-variance outputs through the conv towers
            value = torch.randn(shape, generator=generator) / math.sqrt(np.prod(shape[1:]))
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        state_dict[key] = value
    if architecture == 'MaskRCNN':
        # Make class 0 likely, so that detections pass the score threshold and the mask
        # head runs end to end.
        state_dict['roi_heads.box_predictor.cls_score.bias'][0] += 6.0
    return state_dict


def build_detector(config: str):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(REPO / config))
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).eval()


def converted_detector(architecture: str, backbone: str) -> tuple:
    """(detectron2 weights, converted weights, meta, mmdet model loaded strictly)."""
    weights = synthetic_detectron2(architecture, backbone)
    converted, meta = convert_detectron2_detector(weights)
    model = build_detector(meta['config'])
    model.load_state_dict(converted, strict=True)
    return weights, converted, meta, model


@pytest.fixture(scope='module')
def retinanet():
    return converted_detector('RetinaNet', 'rest_small')


@pytest.fixture(scope='module')
def mask_rcnn():
    return converted_detector('MaskRCNN', 'restv2_tiny')


# ---------------------------------------------------------------------------------------
# The key layout and the converter.
# ---------------------------------------------------------------------------------------
# Real detectron2's key dumps (tests/data/detectron2/provenance.json says how they were
# made): model name -> (architecture, backbone, the config that must evaluate it).
RELEASED = {
    'retinanet_rest_small': ('RetinaNet', 'rest_small', 'retinanet_rest_small_coco.py'),
    'retinanet_rest_base': ('RetinaNet', 'rest_base', 'retinanet_rest_base_coco.py'),
    'retinanet_restv2_tiny': ('RetinaNet', 'restv2_tiny', 'retinanet_restv2_tiny_3x_coco.py'),
    'mask_rcnn_rest_small': ('MaskRCNN', 'rest_small', 'mask_rcnn_rest_small_coco.py'),
    'mask_rcnn_rest_base': ('MaskRCNN', 'rest_base', 'mask_rcnn_rest_base_coco.py'),
    'mask_rcnn_restv2_tiny': ('MaskRCNN', 'restv2_tiny', 'mask_rcnn_restv2_tiny_3x_coco.py'),
    'mask_rcnn_restv2_small': ('MaskRCNN', 'restv2_small', 'mask_rcnn_restv2_small_3x_coco.py'),
    'mask_rcnn_restv2_base': ('MaskRCNN', 'restv2_base', 'mask_rcnn_restv2_base_3x_coco.py'),
}


def _real_layout(model: str) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v) for k, v in
            json.loads((KEY_DUMPS / f'{model}_keys.json').read_text()).items()}


def test_every_dump_is_covered():
    assert sorted(p.name[:-len('_keys.json')] for p in KEY_DUMPS.glob('*_keys.json')) == \
        sorted(RELEASED)


@pytest.mark.parametrize('model', sorted(RELEASED))
def test_layout_equals_real_detectron2(model):
    """The layout the synthetic checkpoints use is the one real detectron2 writes (its
    current version saves no buffers; older ones add pixel statistics and cell anchors)."""
    architecture, backbone, _ = RELEASED[model]
    assert dict(detectron2_layout(architecture, backbone, buffers=False)) == _real_layout(model)


@needs_full_stack
@pytest.mark.parametrize('model', sorted(RELEASED))
def test_every_released_layout_converts_and_loads_strictly(model):
    """Each released model's real key layout: every key mapped, the matching config named,
    and the converted weights load strictly into the model that config builds."""
    architecture, backbone, config = RELEASED[model]
    weights = {k: torch.zeros(shape) for k, shape in _real_layout(model).items()}
    converted, meta = convert_detectron2_detector(weights)
    assert (meta['architecture'], meta['backbone'], meta['config']) == (
        architecture, backbone, f'configs/detection/{config}')
    assert meta['input_format'] == ('BGR' if backbone.startswith('rest_') else 'RGB')
    build_detector(meta['config']).load_state_dict(converted, strict=True)


@needs_full_stack
def test_retinanet_converts_and_loads_strictly(retinanet):
    weights, converted, meta, _ = retinanet  # the fixture loads strictly
    assert meta == dict(
        source='detectron2', architecture='RetinaNet', backbone='rest_small',
        config='configs/detection/retinanet_rest_small_coco.py', num_classes=80,
        pixel_mean=V1_PIXELS['mean'], pixel_std=V1_PIXELS['std'], input_format='BGR',
        preprocessing=dict(mean=V1_PIXELS['mean'], std=V1_PIXELS['std'], bgr_to_rgb=False,
                           source=meta['preprocessing']['source']),
        checked_buffers=['pixel_mean', 'pixel_std'] + [
            f'anchor_generator.cell_anchors.{i}' for i in range(5)])
    json.dumps(meta)
    # Trained output norms map to ours (stage 4's is the ImageNet `norm`), never dropped.
    for ours, theirs in (('norm1', 'norm2'), ('norm2', 'norm3'), ('norm3', 'norm')):
        assert torch.equal(converted[f'backbone.{ours}.weight'],
                           weights[f'backbone.bottom_up.{theirs}.weight'])
    assert torch.equal(converted['neck.fpn_convs.4.conv.weight'],
                       weights['backbone.top_block.p7.weight'])


@needs_full_stack
def test_mask_rcnn_converts_and_loads_strictly(mask_rcnn):
    weights, converted, meta, _ = mask_rcnn
    assert (meta['architecture'], meta['backbone'], meta['config'], meta['input_format']) == (
        'MaskRCNN', 'restv2_tiny', 'configs/detection/mask_rcnn_restv2_tiny_3x_coco.py', 'RGB')
    assert meta['preprocessing']['mean'] == V2_PIXELS['mean']
    assert meta['preprocessing']['bgr_to_rgb'] is True
    for i in range(4):
        assert torch.equal(converted[f'backbone.norm{i}.weight'],
                           weights[f'backbone.bottom_up.norm_{i + 1}.0.weight'])
    # One anchor size per RPN level: detectron2's and mmdet's orders agree.
    assert torch.equal(converted['rpn_head.rpn_reg.weight'],
                       weights['proposal_generator.rpn_head.anchor_deltas.weight'])


@needs_full_stack
def test_conversion_is_pure_and_deterministic():
    weights = synthetic_detectron2('RetinaNet', 'rest_small', buffers=False)
    before = {k: v.clone() for k, v in weights.items()}
    first, meta1 = convert_detectron2_detector(weights)
    second, meta2 = convert_detectron2_detector(weights)
    assert meta1 == meta2 and list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(weights[k], before[k]) for k in weights)


@needs_full_stack
def test_new_detectron2_without_buffers(retinanet):
    """Newer detectron2 keeps pixel statistics and anchors out of the checkpoint: the
    input is then the backbone version's recipe, and the meta says so."""
    weights = synthetic_detectron2('RetinaNet', 'rest_small', buffers=False)
    converted, meta = convert_detectron2_detector(weights)
    assert set(converted) == set(retinanet[1])
    assert meta['pixel_mean'] is None and meta['pixel_std'] is None
    assert meta['checked_buffers'] == []
    assert meta['preprocessing']['mean'] == V1_PIXELS['mean']
    assert 'not in the checkpoint' in meta['preprocessing']['source']


@needs_full_stack
def test_pkl_numpy_values_convert(retinanet):
    """detectron2's .pkl files: ``{"model": {key: numpy array}, "__author__": ...}``."""
    weights = synthetic_detectron2('RetinaNet', 'rest_small')
    pkl = {'model': {k: v.numpy() for k, v in weights.items()}, '__author__': 'ResT'}
    assert is_detectron2_detector(pkl)
    converted, _ = convert_detectron2_detector(pkl)
    assert all(torch.equal(converted[k], v) for k, v in retinanet[1].items())


def test_backbone_only_is_not_a_detector():
    backbone = {f'backbone.bottom_up.{k}': torch.zeros(v)
                for k, v in IMAGENET_KEYS['rest_small'].items()}
    assert not is_detectron2_detector(backbone)
    assert is_detectron2_detector(synthetic_detectron2('MaskRCNN', 'restv2_tiny', False))


@pytest.mark.parametrize('key', ['roi_heads.mask_head.mask_fcn5.weight',
                                 'backbone.bottom_up.stage5.0.norm1.weight',
                                 'backbone.bottom_up.head.weight', 'proposal_generator.foo'])
def test_unexplained_key_is_named(key):
    weights = synthetic_detectron2('MaskRCNN', 'restv2_tiny', buffers=False)
    weights[key] = torch.zeros(4)
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        convert_detectron2_detector(weights)


def test_missing_key_is_named():
    weights = synthetic_detectron2('RetinaNet', 'rest_small', buffers=False)
    del weights['head.bbox_subnet.6.bias']
    with pytest.raises(ValueError, match=r'head\.bbox_subnet\.6\.bias'):
        convert_detectron2_detector(weights)


@needs_full_stack
def test_wrong_buffers_are_refused():
    weights = synthetic_detectron2('RetinaNet', 'rest_small')
    weights['anchor_generator.cell_anchors.2'] = weights['anchor_generator.cell_anchors.3']
    with pytest.raises(ValueError, match=r'anchor_generator\.cell_anchors\.2'):
        convert_detectron2_detector(weights)
    del weights['anchor_generator.cell_anchors.2']
    with pytest.raises(ValueError, match=r'anchor_generator\.cell_anchors\.2'):
        convert_detectron2_detector(weights)
    weights = synthetic_detectron2('MaskRCNN', 'restv2_tiny')
    weights['pixel_mean'] = torch.zeros(4, 1, 1)
    with pytest.raises(ValueError, match='pixel_mean'):
        convert_detectron2_detector(weights)


def test_configs_table_points_at_existing_configs():
    for config in CONFIGS.values():
        assert (REPO / config).is_file(), config


# ---------------------------------------------------------------------------------------
# Semantics, against the reference written from detectron2's source.
# ---------------------------------------------------------------------------------------
def _levels_hwa(tensor: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """mmdet's per-level ``(A * C, H, W)`` output as ``(H * W, A, C)``."""
    return tensor.permute(1, 2, 0).reshape(-1, tensor.shape[0] // per_anchor, per_anchor)


@needs_full_stack
def test_anchor_orders():
    """detectron2 is size-major, mmdet ratio-major; the permutation maps one to the other."""
    from mmdet.models.task_modules.prior_generators import AnchorGenerator
    for architecture, sizes in (('RetinaNet', ref.RETINANET_SIZES), ('MaskRCNN', ref.RPN_SIZES)):
        cfg = dict(ARCHITECTURES[architecture]['anchor_generator'])
        cfg.pop('type')
        generator = AnchorGenerator(**cfg)
        order = mmdet_to_detectron2_anchor_order(architecture)
        for level, base in enumerate(generator.base_anchors):
            expected = ref.cell_anchors(sizes[level])[order].double()
            # Both round the same real numbers to float32, by different routes.
            bound = 4 * EPS32 * expected.abs().max()
            assert (base.double() - expected).abs().max() <= bound
    assert mmdet_to_detectron2_anchor_order('RetinaNet') == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert mmdet_to_detectron2_anchor_order('MaskRCNN') == [0, 1, 2]


def _box_difference(boxes: torch.Tensor, wanted: torch.Tensor, anchors: torch.Tensor,
                    deltas: torch.Tensor) -> Tuple[float, int]:
    """Largest difference between mmdet's decoded boxes and detectron2's, and how many
    anchors have dw or dh below -log(1000/16): mmdet clamps those from below too
    (test_box_decoding_clamps), detectron2 does not, so there mmdet's box is compared with
    detectron2's decoding of the clamped deltas."""
    below = (deltas[:, 2:] < -ref.SCALE_CLAMP).any(dim=1)
    clamped = torch.cat([deltas[:, :2], deltas[:, 2:].clamp(min=-ref.SCALE_CLAMP)], dim=1)
    wanted = torch.where(below[:, None], ref.apply_deltas(clamped, anchors), wanted)
    return (boxes - wanted).abs().max().item(), int(below.sum())


@needs_full_stack
def test_retinanet_scores_the_boxes_detectron2_scores(retinanet):
    """Per anchor: detectron2's anchor, score for every class and decoded box (FPN with
    P6/P7 from C5 and a ReLU before P7, head, anchors, Box2BoxTransform) equal the
    converted mmdet model's (neck, bbox_head, anchor generator, bbox coder)."""
    weights, _, _, model = retinanet
    weights = {k: v.double() for k, v in weights.items()}
    model = model.double()
    torch.manual_seed(1)
    # C3..C5 of a 160x224 input (a multiple of 32, as both libraries pad it).
    features = [torch.randn(1, c, 160 // s, 224 // s, dtype=torch.float64)
                for c, s in ((128, 8), (256, 16), (512, 32))]
    expected = ref.retinanet_per_anchor(features, weights)
    with torch.no_grad():
        cls_scores, bbox_preds = model.bbox_head(model.neck(tuple(features)))
    priors = model.bbox_head.prior_generator.grid_priors(
        [c.shape[-2:] for c in cls_scores], dtype=torch.float64, device='cpu')
    order = mmdet_to_detectron2_anchor_order('RetinaNet')
    worst = dict(anchors=0., scores=0., boxes=0., clamped_from_below=0)
    for level, (cls, reg, anchors) in enumerate(zip(cls_scores, bbox_preds, priors)):
        wanted = {k: v.view(-1, 9, v.shape[-1])[:, order].reshape(-1, v.shape[-1])
                  for k, v in expected[level].items()}
        deltas = _levels_hwa(reg[0], 4).reshape(-1, 4)
        boxes = model.bbox_head.bbox_coder.decode(anchors, deltas)
        scores = _levels_hwa(cls[0], NUM_CLASSES).sigmoid().reshape(-1, NUM_CLASSES)
        scale = wanted['boxes'].abs().max().item()
        box_diff, clamped = _box_difference(boxes, wanted['boxes'], wanted['anchors'], deltas)
        diffs = dict(anchors=(anchors - wanted['anchors']).abs().max().item(), boxes=box_diff,
                     scores=(scores - wanted['scores']).abs().max().item())
        # Anchors: float32 base anchors (a few roundings of values <= scale); boxes add
        # float64 arithmetic on top; scores: float64 throughout.
        assert diffs['anchors'] <= 8 * EPS32 * scale, (level, diffs)
        assert diffs['boxes'] <= 16 * EPS32 * scale, (level, diffs)
        assert diffs['scores'] <= 1e-12, (level, diffs)
        worst = dict(worst, **{k: max(worst[k], v) for k, v in diffs.items()})
        worst['clamped_from_below'] += clamped
    print(f'RetinaNet vs reference, largest differences: {worst}')


def _match(found: dict, wanted: dict) -> Tuple[int, float]:
    """(detections of ``wanted`` with no equal-label, equal-score one in ``found``, largest
    box difference among the matched)."""
    unmatched, worst = 0, 0.
    for box, score, label in zip(wanted['boxes'], wanted['scores'], wanted['labels']):
        same = (found['labels'] == label) & ((found['scores'] - score).abs() <= 1e-5)
        if not same.any():
            unmatched += 1
            continue
        worst = max(worst, (found['boxes'][same] - box).abs().max(dim=1)[0].min().item())
    return unmatched, worst


@needs_full_stack
def test_retinanet_detections(retinanet):
    """Thresholds, top-k, per-class NMS and the 100 best, as detectron2 runs them. mmdet's
    RetinaHead clips boxes to the image before NMS (its bbox coder's ``clip_border``),
    detectron2 after (``detector_postprocess``, which also drops boxes left empty): our
    configs' ``LateClippingRetinaHead`` does it detectron2's way and gives its detections;
    the early clip, on this random model (boxes everywhere), keeps other boxes."""
    weights, _, _, model = retinanet
    assert type(model.bbox_head).__name__ == 'LateClippingRetinaHead'
    weights = {k: v.double() for k, v in weights.items()}
    model = model.float()  # mmcv's NMS takes float32 only; the reference runs in float64
    torch.manual_seed(5)
    features = [torch.randn(1, c, 160 // s, 224 // s) for c, s in ((128, 8), (256, 16),
                                                                     (512, 32))]
    image_size = (150, 210)  # padded to 160 x 224
    expected = ref.retinanet_detections(
        ref.retinanet_per_anchor([f.double() for f in features], weights), image_size)
    with torch.no_grad():
        outputs = model.bbox_head(model.neck(tuple(features)))
    metas = [dict(img_shape=image_size)]
    late = model.bbox_head.predict_by_feat(*outputs, batch_img_metas=metas, rescale=False)[0]
    assert len(expected['scores']) == 100
    # float32 against float64: scores to ~1e-6, boxes (up to ~400 px) to ~1e-4.
    assert torch.equal(late.labels, expected['labels'])
    assert (late.scores - expected['scores']).abs().max() <= 1e-5
    assert (late.bboxes - expected['boxes']).abs().max() <= 1e-3

    coder = model.bbox_head.bbox_coder
    coder.clip_border = True  # mmdet's RetinaHead: clipped before NMS
    try:
        found = model.bbox_head.predict_by_feat(*outputs, batch_img_metas=metas,
                                                rescale=False)[0]
    finally:
        coder.clip_border = False
    unmatched, worst = _match(dict(boxes=found.bboxes, scores=found.scores,
                                   labels=found.labels), expected)
    assert unmatched > 0  # the order matters on this model: the test can tell them apart
    print(f'RetinaNet detections, clipped before NMS (mmdet) vs after (detectron2): '
          f'{unmatched} of {len(expected["scores"])} differ; matched boxes within {worst:.2e}')


@needs_full_stack
def test_rpn_anchors_and_deltas(mask_rcnn):
    """Mask R-CNN's RPN on the converted FPN: anchors, objectness and decoded proposals
    per anchor equal detectron2's (P2..P5 and P6 by max pooling)."""
    weights, _, _, model = mask_rcnn
    weights = {k: v.double() for k, v in weights.items()}
    model = model.double()
    torch.manual_seed(2)
    features = [torch.randn(1, c, 128 // s, 192 // s, dtype=torch.float64)
                for c, s in ((96, 4), (192, 8), (384, 16), (768, 32))]
    pyramid = ref.fpn(features, weights, first_stage=2, top_block='maxpool')
    expected = ref.rpn_per_anchor(pyramid, weights)
    with torch.no_grad():
        feats = model.neck(tuple(features))
        cls_scores, bbox_preds = model.rpn_head(feats)
    priors = model.rpn_head.prior_generator.grid_priors(
        [c.shape[-2:] for c in cls_scores], dtype=torch.float64, device='cpu')
    worst = dict(features=0., anchors=0., logits=0., boxes=0., clamped_from_below=0)
    for level, (cls, reg, anchors) in enumerate(zip(cls_scores, bbox_preds, priors)):
        wanted = dict(expected[level], features=pyramid[level])
        deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)
        box_diff, clamped = _box_difference(model.rpn_head.bbox_coder.decode(anchors, deltas),
                                            wanted['boxes'], wanted['anchors'], deltas)
        diffs = dict(features=(feats[level] - wanted['features']).abs().max().item(),
                     logits=(cls[0].permute(1, 2, 0).reshape(-1) - wanted['logits']).abs().max()
                     .item(),
                     anchors=(anchors - wanted['anchors']).abs().max().item(), boxes=box_diff)
        scale = wanted['boxes'].abs().max().item()
        for name, tol in (('features', 1e-12), ('logits', 1e-12),
                          ('anchors', 8 * EPS32 * scale), ('boxes', 16 * EPS32 * scale)):
            assert diffs[name] <= tol, (level, name, diffs)
        worst = dict(worst, **{k: max(worst[k], v) for k, v in diffs.items()})
        worst['clamped_from_below'] += clamped
    print(f'RPN vs reference, largest differences: {worst}')


@needs_full_stack
def test_roi_level_assignment(mask_rcnn):
    """mmdet's ``map_roi_levels`` (finest_scale 56) equals detectron2's
    ``assign_boxes_to_levels`` (canonical box 224 at level 4, levels 2..5), boxes at the
    level boundaries (sqrt(area) = 112, 224, 448) included. The epsilons inside the log
    differ (mmdet 1e-6 on size/56, detectron2 1e-8 on size/224), so boxes less than
    5e-7 (relative) below a boundary may go one level apart; none of these boxes are."""
    extractor = mask_rcnn[3].roi_head.bbox_roi_extractor
    sides = torch.tensor([1., 8., 55.9, 56., 111.9, 112., 112.1, 150., 223.9, 224., 224.1,
                          300., 447.9, 448., 448.1, 900., 2000.])
    torch.manual_seed(3)
    random_sides = torch.rand(2000) * 1000 + 1
    aspect = torch.rand(2000) * 3 + 0.3
    widths = torch.cat([sides, random_sides * aspect.sqrt()])
    heights = torch.cat([sides, random_sides / aspect.sqrt()])
    x0, y0 = torch.rand(len(widths)) * 50, torch.rand(len(widths)) * 50
    boxes = torch.stack([x0, y0, x0 + widths, y0 + heights], dim=1)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    mmdet_levels = extractor.map_roi_levels(rois, num_levels=4)
    expected = ref.assign_boxes_to_levels(boxes)
    assert torch.equal(mmdet_levels, expected)
    assert expected[:len(sides)].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


@needs_full_stack
def test_box_head_decoding(mask_rcnn):
    """Class probabilities and clipped class-specific boxes of the box head, with
    detectron2's (10, 10, 5, 5) weights and its scale clamp, as mmdet predicts them."""
    weights, _, _, model = mask_rcnn
    weights = {k: v.double() for k, v in weights.items()}
    head = model.roi_head.bbox_head.double()
    torch.manual_seed(4)
    pooled = torch.randn(50, FPN_CHANNELS, 7, 7, dtype=torch.float64)
    xy = torch.rand(50, 2, dtype=torch.float64) * 300
    proposals = torch.cat([xy, xy + torch.rand(50, 2, dtype=torch.float64) * 200 + 4], dim=1)
    image_size = (320, 400)
    expected_scores, expected_boxes = ref.box_head(pooled, proposals, weights, image_size)
    with torch.no_grad():
        cls_score, bbox_pred = head(pooled)
    scores = torch.softmax(cls_score, dim=-1)
    boxes = head.bbox_coder.decode(proposals.repeat_interleave(NUM_CLASSES, dim=0),
                                   bbox_pred.view(-1, 4), max_shape=image_size)
    score_diff = (scores - expected_scores).abs().max().item()
    box_diff = (boxes.view(50, -1) - expected_boxes).abs().max().item()
    assert score_diff <= 1e-12 and box_diff <= 1e-9, (score_diff, box_diff)
    print(f'box head vs reference, largest differences: scores {score_diff:.1e}, '
          f'boxes {box_diff:.1e}')


@needs_full_stack
def test_box_decoding_clamps():
    """detectron2 clamps dw/dh from above only (log(1000/16)), mmdet from both sides: they
    agree for every delta above -log(1000/16), i.e. unless a box shrinks to less than
    1/62.5 of its anchor."""
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
    coder = DeltaXYWHBBoxCoder(target_means=[0.] * 4, target_stds=[1.] * 4)
    anchors = torch.tensor([[10., 20., 110., 70.]], dtype=torch.float64).repeat(7, 1)
    dw = torch.tensor([-4., -1., 0., 1., 4., 5., 9.], dtype=torch.float64)
    deltas = torch.stack([dw / 10, -dw / 10, dw, -dw.clamp(max=4)], dim=1)
    assert torch.allclose(coder.decode(anchors, deltas), ref.apply_deltas(deltas, anchors),
                          rtol=0, atol=1e-9)
    below = torch.tensor([[0., 0., -5., 0.]], dtype=torch.float64)
    assert not torch.allclose(coder.decode(anchors[:1], below),
                              ref.apply_deltas(below, anchors[:1]))


# ---------------------------------------------------------------------------------------
# Evaluation settings.
# ---------------------------------------------------------------------------------------
DETECTION_CONFIGS = sorted(str(p.relative_to(REPO)) for p in
                           (REPO / 'configs' / 'detection').glob('*.py'))


def _architecture_of(cfg) -> str:
    return 'RetinaNet' if cfg.model.type == 'RetinaNet' else 'MaskRCNN'


@needs_full_stack
@pytest.mark.parametrize('base,architecture', [
    ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'RetinaNet'),
    ('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 'MaskRCNN')])
def test_mmdet_defaults_already_equal_detectron2(tmp_path, base, architecture):
    """mmdet's own RetinaNet and Mask R-CNN configs already test like detectron2 (our
    configs inherit them): the same top-k, thresholds, NMS, resize and padding."""
    path = tmp_path / 'base.py'
    path.write_text(f'_base_ = [{base!r}]\n')
    cfg = Config.fromfile(str(path))
    assert cfg.model.test_cfg.to_dict() == DETECTRON2_TEST_CFG[architecture]
    load, resize = _check_test_input(cfg)
    # Not the image library: mmdet decodes and resizes with OpenCV by default.
    assert load.get('imdecode_backend', 'cv2') == 'cv2'
    assert resize.get('backend', 'cv2') == 'cv2'


def _check_test_input(cfg):
    """The test-time resize and padding; returns the pipeline's load and resize steps."""
    pipeline = cfg.test_dataloader.dataset.pipeline
    assert [t.type for t in pipeline][:2] == ['LoadImageFromFile', 'Resize']
    load, resize = pipeline[:2]
    assert tuple(resize.scale) == DETECTRON2_TEST_INPUT['scale']
    assert resize.keep_ratio is DETECTRON2_TEST_INPUT['keep_ratio']
    assert resize.get('interpolation', 'bilinear') == DETECTRON2_TEST_INPUT['interpolation']
    assert cfg.model.data_preprocessor.pad_size_divisor == \
        DETECTRON2_TEST_INPUT['pad_size_divisor']
    return load, resize


@needs_full_stack
@pytest.mark.parametrize('config', DETECTION_CONFIGS)
def test_configs_evaluate_like_detectron2(config):
    """Every detection config: detectron2's test settings, anchors, box coding, FPN top
    block and RoI pooling."""
    cfg = Config.fromfile(str(REPO / config))
    architecture = _architecture_of(cfg)
    assert cfg.model.test_cfg.to_dict() == DETECTRON2_TEST_CFG[architecture]
    load, resize = _check_test_input(cfg)
    assert load.get('imdecode_backend') == DETECTRON2_TEST_INPUT['imdecode_backend']
    assert resize.get('backend') == DETECTRON2_TEST_INPUT['resize_backend']
    anchor_head = cfg.model.bbox_head if architecture == 'RetinaNet' else cfg.model.rpn_head
    generator = anchor_head.anchor_generator.to_dict()
    assert {k: generator[k] for k in ARCHITECTURES[architecture]['anchor_generator']} == \
        ARCHITECTURES[architecture]['anchor_generator']
    assert generator.get('center_offset', 0.) == 0.  # ANCHOR_GENERATOR.OFFSET 0.0
    coders = [(anchor_head.bbox_coder, ref.DENSE_WEIGHTS)]
    if architecture == 'RetinaNet':
        assert cfg.model.neck.add_extra_convs == 'on_input'  # P6 from C5
        assert cfg.model.neck.relu_before_extra_convs is True  # ReLU between P6 and P7
    else:
        assert cfg.model.neck.get('add_extra_convs', False) is False  # max-pooled P6
        coders.append((cfg.model.roi_head.bbox_head.bbox_coder, ref.BOX_HEAD_WEIGHTS))
        for name, size in (('bbox_roi_extractor', 7), ('mask_roi_extractor', 14)):
            extractor = cfg.model.roi_head[name]
            layer = extractor.roi_layer  # ROIAlignV2: mmcv's RoIAlign, aligned by default
            assert (layer.type, layer.output_size, layer.sampling_ratio) == ('RoIAlign', size, 0)
            assert layer.get('aligned', True) is True and layer.get('pool_mode', 'avg') == 'avg'
            assert extractor.featmap_strides == [4, 8, 16, 32]
            assert extractor.get('finest_scale', 56) == 224 / 4  # canonical 224 at P4
    for coder, box_weights in coders:
        assert coder.type == 'DeltaXYWHBBoxCoder'
        assert list(coder.target_means) == [0.] * 4
        assert np.allclose(coder.target_stds, [1 / w for w in box_weights])
        assert coder.get('add_ctr_clamp', False) is False


def test_resized_size_equals_detectron2():
    """mmcv's keep-ratio rescale picks detectron2's ResizeShortestEdge size (short side
    800, long side at most 1333) for every image size up to 2000 x 2000 (step 7), except
    where the exact size is a half pixel: both round half up, but reach it by different
    float roundings (e.g. 99 x 946: 139.5 in mmcv, 139.49999999999997 in detectron2)."""
    import mmcv
    long_side, short_side = DETECTRON2_TEST_INPUT['scale']
    sizes = range(1, 2000, 7)
    differ = []
    for h in sizes:
        for w in sizes:
            ours = mmcv.rescale_size((w, h), (long_side, short_side))[::-1]
            theirs = ref.resize_shortest_edge(h, w, short_side, long_side)
            if ours != theirs:
                scale = min(Fraction(long_side, max(h, w)), Fraction(short_side, min(h, w)))
                exact = (h * scale, w * scale)
                differ.append((h, w))
                assert all(a == b or (abs(a - b) == 1 and e.denominator == 2)
                           for a, b, e in zip(ours, theirs, exact)), (h, w, ours, theirs)
    assert len(differ) <= 4, differ  # 2 of 81796 sizes here: (99, 946) and (946, 99)


@needs_full_stack
def test_check_preprocessing_names_the_fitting_config(retinanet, mask_rcnn):
    v1_meta, v2_meta = retinanet[2], mask_rcnn[2]
    v1_cfg = Config.fromfile(str(REPO / v1_meta['config']))
    v2_cfg = Config.fromfile(str(REPO / v2_meta['config']))
    check_preprocessing(v1_cfg, v1_meta)
    check_preprocessing(v2_cfg, v2_meta)
    for cfg, meta in ((v2_cfg, v1_meta), (v1_cfg, v2_meta)):
        with pytest.raises(ValueError, match=meta['config']):
            check_preprocessing(cfg, meta)
    v1_cfg.model.data_preprocessor.bgr_to_rgb = True
    with pytest.raises(ValueError, match='bgr_to_rgb=True'):
        check_preprocessing(v1_cfg, v1_meta)


# ---------------------------------------------------------------------------------------
# End to end: tools/convert_weights.py, then tools/test.py on the toy data.
# ---------------------------------------------------------------------------------------
TOY = ToyDataSpec(num_train=1, num_val=2, height=96, width=128, min_size=16, max_size=40,
                  max_objects=3, seed=3)


@pytest.fixture(scope='module')
def toy_coco(tmp_path_factory) -> Path:
    """Toy images whose annotations use COCO's 80 category names (the shapes are
    'person', 'bicycle', 'car'), so the real configs evaluate them unchanged."""
    from mmdet.datasets import CocoDataset
    root = tmp_path_factory.mktemp('toy')
    generate_toy_datasets(str(root), TOY)
    ann_file = root / 'toy_coco' / 'annotations' / 'instances_val.json'
    coco = json.loads(ann_file.read_text())
    coco['categories'] = [dict(id=i + 1, name=name, supercategory='coco')
                          for i, name in enumerate(CocoDataset.METAINFO['classes'])]
    ann_file.write_text(json.dumps(coco))
    return root / 'toy_coco'


def _run(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _toy_options(root: Path) -> list:
    ann = root / 'annotations' / 'instances_val.json'
    return ['--cfg-options', f'test_dataloader.dataset.data_root={root}/',
            'test_dataloader.dataset.ann_file=annotations/instances_val.json',
            'test_dataloader.dataset.data_prefix.img=val/', f'test_evaluator.ann_file={ann}',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


@needs_full_stack
@pytest.mark.slow
@pytest.mark.parametrize('architecture,backbone', [('RetinaNet', 'rest_small'),
                                                   ('MaskRCNN', 'restv2_tiny')])
def test_converted_checkpoint_runs_through_test_tool(tmp_path, toy_coco, architecture,
                                                     backbone):
    src, dst = tmp_path / 'model_final.pth', tmp_path / 'converted.pth'
    torch.save({'model': synthetic_detectron2(architecture, backbone), 'iteration': 90000}, src)
    _run(REPO / 'tools' / 'convert_weights.py', src, dst)
    meta = torch.load(dst, weights_only=True)['meta']
    assert meta['source'] == 'detectron2' and meta['architecture'] == architecture
    result = _run(REPO / 'tools' / 'test.py', meta['config'], dst, '--work-dir',
                  tmp_path / 'work', *_toy_options(toy_coco))
    metric = 'coco/bbox_mAP' if architecture == 'RetinaNet' else 'coco/segm_mAP'
    assert metric in result.stdout + result.stderr
    # The same checkpoint with the other input format is refused before anything runs.
    bgr_to_rgb = architecture == 'RetinaNet'
    wrong = _run(REPO / 'tools' / 'test.py', meta['config'], dst, '--work-dir',
                 tmp_path / 'wrong', *_toy_options(toy_coco),
                 f'model.data_preprocessor.bgr_to_rgb={bgr_to_rgb}', check=False)
    assert wrong.returncode != 0
    assert f'evaluate it with {meta["config"]}' in wrong.stderr


@needs_full_stack
def test_convert_released_recognises_a_detectron2_detector():
    weights, meta = convert_released({'model': synthetic_detectron2('RetinaNet', 'rest_small')})
    assert meta['kind'] == 'detector' and meta['source'] == 'detectron2'
    assert meta['config'] == 'configs/detection/retinanet_rest_small_coco.py'
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
