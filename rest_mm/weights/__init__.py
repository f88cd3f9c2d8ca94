"""Checkpoints: reading them safely, converting every layout the authors released, loading.

* :mod:`.files` reads a file or URL (integrity checked, nothing but data unpickled);
* :mod:`.state_dicts` finds the state dict inside a file and checks its values;
* :mod:`.backbone` converts backbone weights to our key names and loads them strictly;
* :mod:`.detectron2` and :mod:`.mmseg0x` convert the authors' whole detectors and UperNets.

:func:`convert_released` recognises a checkpoint by its keys: a detectron2 detector
(RetinaNet, Mask R-CNN) becomes a whole mmdet model, an mmseg 0.x UperNet a whole mmseg 1.x
model, and anything else that holds a ResT/ResTV2 backbone (the ImageNet release, its
detectron2 conversion, our own detectors and segmentors) backbone weights for
``init_cfg=dict(type='Pretrained', checkpoint=...)``.
"""
from typing import Dict, Mapping, Tuple

import torch

from .backbone import convert_checkpoint, describe_weights, load_pretrained, suggest_arch
from .detectron2 import convert_detectron2_detector, is_detectron2_detector
from .files import read_checkpoint
from .mmseg0x import convert_mmseg0x_segmentor, is_mmseg0x_segmentor
from .state_dicts import as_tensors, check_finite, unwrap_checkpoint

__all__ = ['check_finite', 'convert_checkpoint', 'convert_released', 'load_pretrained',
           'read_checkpoint', 'suggest_arch', 'unwrap_checkpoint']


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
        CheckpointError: when a value is not a tensor (or numpy array).
    """
    if is_mmseg0x_segmentor(checkpoint):
        state_dict, meta = convert_mmseg0x_segmentor(checkpoint)
        return as_tensors(state_dict, 'mmseg 0.x checkpoint'), dict(meta, kind='segmentor')
    if is_detectron2_detector(checkpoint):
        state_dict, meta = convert_detectron2_detector(checkpoint)
        return as_tensors(state_dict, 'detectron2 checkpoint'), dict(meta, kind='detector')
    weights = as_tensors(convert_checkpoint(checkpoint), 'checkpoint')
    if not any(k.startswith('stages.') for k in weights):
        raise ValueError(f'it holds no ResT/ResTV2 backbone weights (first keys: '
                         f'{list(weights)[:5]}); expected an authors\' ImageNet, detectron2 or '
                         f'mmseg 0.x checkpoint, or one written by this repo')
    model_name, found = describe_weights(weights)
    return weights, dict(kind='backbone', model=model_name, embed_dims=list(found['embed_dims']),
                         depths=list(found['depths']))
