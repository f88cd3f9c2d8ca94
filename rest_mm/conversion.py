"""One entry point for every checkpoint layout the authors released.

``convert_released`` recognises a checkpoint by its keys and returns our weights with a
description of what they are:

* a detectron2 detector (RetinaNet, Mask R-CNN; :mod:`rest_mm.detectron2`) becomes a whole
  mmdet model;
* an mmseg 0.x UperNet (:mod:`rest_mm.mmseg0x`) becomes a whole mmseg 1.x model;
* anything else that holds a ResT/ResTV2 backbone (the ImageNet release, its detectron2
  conversion, our own detectors and segmentors) becomes backbone weights for
  ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
"""
from typing import Dict, Mapping, Tuple

import torch

from .checkpoint import as_tensors, convert_checkpoint, describe_weights, unwrap_checkpoint
from .detectron2 import convert_detectron2_detector, is_detectron2_detector
from .mmseg0x import convert_mmseg0x_segmentor, is_mmseg0x_segmentor


def convert_released(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Our weights and their description, from any checkpoint layout we accept.

    Args:
        checkpoint (Mapping): A loaded checkpoint file.

    Returns:
        tuple: ``(state_dict, meta)``. ``meta['kind']`` is ``'detector'``, ``'segmentor'``
        or ``'backbone'``; the whole-model converters add where the weights came from and
        the config that evaluates them.

    Raises:
        ValueError: when the checkpoint holds no ResT/ResTV2 weights or a key that no rule
            explains.
        RuntimeError: when a value is not a tensor (or numpy array).
    """
    if is_mmseg0x_segmentor(checkpoint):
        state_dict, meta = convert_mmseg0x_segmentor(checkpoint)
        return as_tensors(state_dict, 'mmseg 0.x checkpoint'), dict(meta, kind='segmentor')
    state_dict = unwrap_checkpoint(checkpoint)
    if is_detectron2_detector(state_dict):
        state_dict, meta = convert_detectron2_detector(state_dict)
        return as_tensors(state_dict, 'detectron2 checkpoint'), dict(meta, kind='detector')
    weights = as_tensors(convert_checkpoint(checkpoint), 'checkpoint')
    if not any(k.startswith('stages.') for k in weights):
        raise ValueError(f'it holds no ResT/ResTV2 backbone weights (first keys: '
                         f'{list(weights)[:5]}); expected an authors\' ImageNet, detectron2 or '
                         f'mmseg 0.x checkpoint, or one written by this repo')
    model_name, found = describe_weights(weights)
    return weights, dict(kind='backbone', model=model_name, embed_dims=list(found['embed_dims']),
                         depths=list(found['depths']))
