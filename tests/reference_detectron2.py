"""detectron2's inference semantics, written in plain torch from detectron2's source.

An independent reference for the parts that differ between detectron2 and mmdet, used to
check that a converted detectron2 detector scores, in mmdet, exactly the boxes detectron2
scores. Nothing here imports mmdet or rest_mm; the weights are read under detectron2's own
key names. The facts, each from the detectron2 file named:

* Anchors (``modeling/anchor_generator.py``, ``DefaultAnchorGenerator``): a location's cell
  anchors are ordered size-major (``for size in sizes: for aspect_ratio in ratios``), with
  ``w = sqrt(size**2 / ratio)``, ``h = ratio * w``, centred on (0, 0) and stored as float32;
  they are shifted to ``(x * stride, y * stride)`` (``ANCHOR_GENERATOR.OFFSET`` 0.0),
  locations row-major, anchors inner: ``(H * W * A, 4)``.
* RetinaNet anchor sizes (``Base-RetinaNet.yaml``): ``x * 2 ** (k / 3)`` for ``k`` in 0..2 and
  ``x`` in 32..512; aspect ratios (``config/defaults.py``) 0.5, 1, 2.
* FPN (``modeling/backbone/fpn.py``): 1x1 laterals, 2x nearest upsampling, summed, 3x3
  outputs; ``LastLevelP6P7`` makes P6 from C5 (the backbone's last output) and
  P7 = conv(relu(P6)); ``LastLevelMaxPool`` is ``max_pool2d(P5, kernel 1, stride 2)``.
* RetinaNet head (``modeling/meta_arch/retinanet.py``): four 3x3 conv + ReLU in each subnet,
  then 3x3 convs to ``A * K`` logits and ``A * 4`` deltas; a channel is ``a * K + k``
  (``permute_to_N_HWA_K``); scores are sigmoids.
* Box decoding (``modeling/box_regression.py``, ``Box2BoxTransform.apply_deltas``): widths
  ``x2 - x1``, centres ``x1 + 0.5 * w``, deltas divided by the weights ((1, 1, 1, 1) for
  RetinaNet and the RPN, (10, 10, 5, 5) for the box head), ``dw`` and ``dh`` clamped from
  above only, at ``log(1000 / 16)``.
* RPN head (``modeling/proposal_generator/rpn.py``): a 3x3 conv + ReLU, 1x1 convs to ``A``
  objectness logits and ``A * 4`` deltas.
* RoI-to-level assignment (``modeling/poolers.py``, ``assign_boxes_to_levels``):
  ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to levels 2..5.
* Test-time resize (``data/transforms/augmentation_impl.py``,
  ``ResizeShortestEdge.get_output_shape``): short side to 800, then the long side down to
  1333 if longer, each side rounded with ``int(x + 0.5)``.
* Box head (``modeling/roi_heads/box_head.py``, ``fast_rcnn.py``): flatten, fc1 + ReLU,
  fc2 + ReLU, softmax over ``K + 1`` classes (background last), class-specific deltas,
  boxes clipped to the image.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

SCALE_CLAMP = math.log(1000.0 / 16)
RETINANET_SIZES = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
RPN_SIZES = [[32], [64], [128], [256], [512]]
ASPECT_RATIOS = (0.5, 1.0, 2.0)
RETINANET_STRIDES = (8, 16, 32, 64, 128)
RPN_STRIDES = (4, 8, 16, 32, 64)
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
DENSE_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
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

StateDict = Dict[str, torch.Tensor]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float] = ASPECT_RATIOS
                 ) -> torch.Tensor:
    """One level's cell anchors, size-major, as detectron2 stores them (float32)."""
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size ** 2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, grid_size: Tuple[int, int], stride: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Every anchor of one level, ``(H * W * A, 4)``: locations row-major, anchors inner."""
    height, width = grid_size
    shift_y, shift_x = torch.meshgrid(torch.arange(height, dtype=dtype) * stride,
                                      torch.arange(width, dtype=dtype) * stride, indexing='ij')
    shifts = torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)] * 2, dim=1)
    return (shifts[:, None, :] + cell.to(dtype)[None, :, :]).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor,
                 weights: Sequence[float] = DENSE_WEIGHTS,
                 scale_clamp: float = SCALE_CLAMP) -> torch.Tensor:
    """``Box2BoxTransform.apply_deltas``: deltas ``(N, k * 4)`` on boxes ``(N, 4)``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    boxes = torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                         pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=-1)
    return boxes.reshape(deltas.shape)


def _conv(x: torch.Tensor, weights: StateDict, name: str, **kwargs) -> torch.Tensor:
    return F.conv2d(x, weights[f'{name}.weight'], weights[f'{name}.bias'], **kwargs)


def fpn(features: List[torch.Tensor], weights: StateDict, first_stage: int,
        top_block: str) -> List[torch.Tensor]:
    """detectron2's FPN on backbone outputs (highest resolution first).

    Args:
        features: C{first_stage}.. maps, e.g. C3..C5 for RetinaNet.
        weights: detectron2 state dict (keys ``backbone.fpn_lateral3.weight`` ...).
        first_stage: log2 of the first map's stride.
        top_block: ``'p6p7'`` (RetinaNet) or ``'maxpool'`` (Mask R-CNN).
    """
    stages = range(first_stage, first_stage + len(features))
    laterals = [_conv(c, weights, f'backbone.fpn_lateral{s}') for c, s in zip(features, stages)]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
        merged.insert(0, lateral + F.interpolate(merged[0], scale_factor=2.0, mode='nearest'))
    outputs = [_conv(m, weights, f'backbone.fpn_output{s}', padding=1)
               for m, s in zip(merged, stages)]
    if top_block == 'p6p7':
        p6 = _conv(features[-1], weights, 'backbone.top_block.p6', stride=2, padding=1)
        p7 = _conv(F.relu(p6), weights, 'backbone.top_block.p7', stride=2, padding=1)
        return outputs + [p6, p7]
    if top_block == 'maxpool':
        return outputs + [F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0)]
    raise ValueError(f'top_block must be p6p7 or maxpool, got {top_block!r}')


def to_hwa_k(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """``permute_to_N_HWA_K`` for one image: ``(A * K, H, W)`` -> ``(H * W * A, K)``."""
    _, height, width = tensor.shape
    return tensor.view(-1, k, height, width).permute(2, 3, 0, 1).reshape(-1, k)


def retinanet_head(features: List[torch.Tensor], weights: StateDict, num_convs: int = 4
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per-level logits ``(N, A * K, H, W)`` and deltas ``(N, A * 4, H, W)``."""
    logits, deltas = [], []
    for feature in features:
        cls, reg = feature, feature
        for i in range(num_convs):  # Sequential(conv, ReLU, conv, ReLU, ...)
            cls = F.relu(_conv(cls, weights, f'head.cls_subnet.{2 * i}', padding=1))
            reg = F.relu(_conv(reg, weights, f'head.bbox_subnet.{2 * i}', padding=1))
        logits.append(_conv(cls, weights, 'head.cls_score', padding=1))
        deltas.append(_conv(reg, weights, 'head.bbox_pred', padding=1))
    return logits, deltas


def retinanet_per_anchor(features: List[torch.Tensor], weights: StateDict
                         ) -> List[Dict[str, torch.Tensor]]:
    """Every anchor of image 0 as detectron2's RetinaNet sees it before its top-k.

    Args:
        features: the backbone's C3..C5 (float64 for a tight comparison).
        weights: the detectron2 state dict.

    Returns:
        One dict per level P3..P7: ``anchors`` (HWA, 4), ``scores`` (HWA, K) sigmoids,
        ``boxes`` (HWA, 4) decoded, unclipped (detectron2 decodes before NMS unclipped).
    """
    pyramid = fpn(features, weights, first_stage=3, top_block='p6p7')
    logits, deltas = retinanet_head(pyramid, weights)
    levels = []
    for level, (logit, delta) in enumerate(zip(logits, deltas)):
        num_classes = logit.shape[1] // len(RETINANET_SIZES[level]) // len(ASPECT_RATIOS)
        anchors = grid_anchors(cell_anchors(RETINANET_SIZES[level]), logit.shape[-2:],
                               RETINANET_STRIDES[level], dtype=logit.dtype)
        reg = to_hwa_k(delta[0], 4)
        levels.append(dict(anchors=anchors, scores=to_hwa_k(logit[0], num_classes).sigmoid(),
                           boxes=apply_deltas(reg, anchors)))
    return levels


def rpn_per_anchor(pyramid: List[torch.Tensor], weights: StateDict
                   ) -> List[Dict[str, torch.Tensor]]:
    """Every RPN anchor of image 0 on P2..P6: ``anchors``, ``logits`` (HWA,), ``boxes``."""
    levels = []
    prefix = 'proposal_generator.rpn_head'
    for level, feature in enumerate(pyramid):
        hidden = F.relu(_conv(feature, weights, f'{prefix}.conv', padding=1))
        logits = _conv(hidden, weights, f'{prefix}.objectness_logits')
        deltas = _conv(hidden, weights, f'{prefix}.anchor_deltas')
        anchors = grid_anchors(cell_anchors(RPN_SIZES[level]), feature.shape[-2:],
                               RPN_STRIDES[level], dtype=feature.dtype)
        levels.append(dict(anchors=anchors, logits=to_hwa_k(logits[0], 1)[:, 0],
                           boxes=apply_deltas(to_hwa_k(deltas[0], 4), anchors)))
    return levels


def assign_boxes_to_levels(boxes: torch.Tensor, min_level: int = 2, max_level: int = 5,
                           canonical_box_size: int = 224, canonical_level: int = 4
                           ) -> torch.Tensor:
    """The pyramid level index (0 = P``min_level``) that pools each box ``(N, 4)``."""
    box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level


def box_head(pooled: torch.Tensor, proposals: torch.Tensor, weights: StateDict,
             image_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(R, K + 1)`` and clipped class-specific boxes ``(R, K * 4)``."""
    x = pooled.flatten(1)
    x = F.relu(F.linear(x, weights['roi_heads.box_head.fc1.weight'],
                        weights['roi_heads.box_head.fc1.bias']))
    x = F.relu(F.linear(x, weights['roi_heads.box_head.fc2.weight'],
                        weights['roi_heads.box_head.fc2.bias']))
    scores = F.linear(x, weights['roi_heads.box_predictor.cls_score.weight'],
                      weights['roi_heads.box_predictor.cls_score.bias'])
    deltas = F.linear(x, weights['roi_heads.box_predictor.bbox_pred.weight'],
                      weights['roi_heads.box_predictor.bbox_pred.bias'])
    boxes = apply_deltas(deltas, proposals, BOX_HEAD_WEIGHTS).view(len(proposals), -1, 4)
    height, width = image_size
    boxes = torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                         boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], -1)
    return F.softmax(scores, dim=-1), boxes.reshape(len(proposals), -1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS (torchvision's, which detectron2 calls): indices of the kept boxes by
    decreasing score; a box is dropped when its IoU with a kept one exceeds the threshold."""
    order = scores.argsort(descending=True)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        x0 = torch.maximum(boxes[i, 0], boxes[:, 0])
        y0 = torch.maximum(boxes[i, 1], boxes[:, 1])
        x1 = torch.minimum(boxes[i, 2], boxes[:, 2])
        y1 = torch.minimum(boxes[i, 3], boxes[:, 3])
        inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS per class; the kept indices of all classes by decreasing score."""
    keep = torch.cat([torch.nonzero(classes == c)[:, 0][nms(boxes[classes == c],
                                                              scores[classes == c],
                                                              iou_threshold)]
                      for c in classes.unique()]) if len(boxes) else classes.new_zeros(0)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def retinanet_detections(levels: List[Dict[str, torch.Tensor]], image_size: Tuple[int, int],
                         score_thresh: float = 0.05, topk_candidates: int = 1000,
                         nms_thresh: float = 0.5, max_detections: int = 100
                         ) -> Dict[str, torch.Tensor]:
    """RetinaNet's inference (``inference_single_image``, then ``detector_postprocess`` at
    the input resolution): per level the scores above the threshold, their top k; per-class
    NMS on the unclipped boxes; the best ``max_detections``; then boxes clipped to the
    image and empty ones dropped."""
    boxes, scores, classes = [], [], []
    for level in levels:
        flat = level['scores'].flatten()
        candidates = torch.nonzero(flat > score_thresh)[:, 0]
        top, order = flat[candidates].topk(min(len(candidates), topk_candidates))
        candidates = candidates[order]
        num_classes = level['scores'].shape[1]
        boxes.append(level['boxes'][candidates // num_classes])
        scores.append(top)
        classes.append(candidates % num_classes)
    boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    height, width = image_size
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return dict(boxes=boxes[nonempty], scores=scores[nonempty], labels=classes[nonempty])


def resize_shortest_edge(height: int, width: int, short_edge: int, max_size: int
                         ) -> Tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: the (height, width) an image is resized to."""
    size = short_edge * 1.0
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)
