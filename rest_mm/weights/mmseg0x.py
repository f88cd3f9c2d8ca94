"""The authors' mmseg 0.x UperNet checkpoints as mmseg 1.x checkpoints.

The authors released UperNet with ResTv2-T/S/B trained on ADE20K with mmsegmentation 0.x
(``semantic_segmentation/`` of their repository): files ``{'meta': {...}, 'state_dict':
{...}}`` (perhaps with an ``optimizer``) of an ``EncoderDecoder`` whose backbone keys are the
authors' (``backbone.stem.*``, ``backbone.patch_2..4.*``, ``backbone.stage1..4.*`` and the
output norms ``backbone.norm_1..4``), with mmseg 0.x's ``UPerHead`` as ``decode_head`` and
``FCNHead`` as ``auxiliary_head``.

The backbone goes through :func:`.backbone.convert_model_backbone`. The heads keep their keys:
mmseg 1.2's ``UPerHead`` and ``FCNHead`` name their modules as mmseg 0.x's do
(``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``,
``convs``, ``conv_seg``; ``ConvModule``'s ``conv`` and ``bn``), which
tests/test_weights_mmseg0x.py proves by loading a converted checkpoint strictly into the
model of our config. Any key outside these layouts is an error that names it.
"""
import re
from collections import OrderedDict
from typing import Mapping, Tuple

import torch

from .. import presets
from .backbone import convert_model_backbone, is_v1
from .state_dicts import unwrap_checkpoint

SOURCE = 'mmseg0.x'
# The configs that train and evaluate the released models, by ResTV2 preset.
CONFIGS = {arch: f'configs/segmentation/upernet_restv2_{arch}_ade20k.py'
           for arch in ('tiny', 'small', 'base')}
# The same models tested as the authors tested them (test images resized to multiples of 32).
AUTHORS_TEST_CONFIGS = {arch: f'configs/segmentation/upernet_restv2_{arch}_ade20k_align32.py'
                        for arch in CONFIGS}

_BN = r'bn\.(?:weight|bias|running_mean|running_var|num_batches_tracked)'
_CONV_MODULE = rf'(?:conv\.weight|{_BN})'
# Every key mmseg 0.x's UPerHead (pool scales 1, 2, 3, 6) and FCNHead write.
_HEAD_KEYS = re.compile(
    r'^(?:'
    r'decode_head\.conv_seg\.(?:weight|bias)'
    rf'|decode_head\.(?:psp_modules\.\d+\.1|bottleneck|lateral_convs\.\d+|fpn_convs\.\d+'
    rf'|fpn_bottleneck)\.{_CONV_MODULE}'
    r'|auxiliary_head\.conv_seg\.(?:weight|bias)'
    rf'|auxiliary_head\.convs\.\d+\.{_CONV_MODULE}'
    r')$')
# The authors' ResTV2 names its stages `stage1`..`stage4` (ours: `stages.0`..`stages.3`).
_AUTHORS_BACKBONE = re.compile(r'^backbone\.(?:stage[1-4]\.|patch_[2-4]\.)')


def is_mmseg0x_segmentor(checkpoint: Mapping) -> bool:
    """Whether a loaded file is an mmseg 0.x segmentor with the authors' ResTv2 backbone.

    Args:
        checkpoint (Mapping): The loaded file, ``{'meta': ..., 'state_dict': ...}``, or its
            state dict.

    Returns:
        bool: True when the state dict holds a ``decode_head`` and backbone keys in the
        authors' layout (``backbone.stage1.`` ...), not ours (``backbone.stages.``).
    """
    keys = list(unwrap_checkpoint(checkpoint))
    return (any(k.startswith('decode_head.') for k in keys)
            and any(_AUTHORS_BACKBONE.match(k) for k in keys))


def _dataset_meta(meta: Mapping) -> dict:
    """mmseg 1.x's ``dataset_meta`` from mmseg 0.x's ``CLASSES`` and ``PALETTE``, as plain
    lists (JSON-able)."""
    dataset_meta = {}
    if meta.get('CLASSES') is not None:
        dataset_meta['classes'] = [str(name) for name in meta['CLASSES']]
    if meta.get('PALETTE') is not None:
        dataset_meta['palette'] = [[int(c) for c in colour] for colour in meta['PALETTE']]
    return dataset_meta


def convert_mmseg0x_segmentor(checkpoint: Mapping) -> Tuple['OrderedDict[str, torch.Tensor]',
                                                              dict]:
    """An mmseg 1.x ``EncoderDecoder`` state dict for our config, from the authors' file.

    Args:
        checkpoint (Mapping): The loaded mmseg 0.x file, ``{'meta': ..., 'state_dict': ...}``
            (other top-level entries, such as ``optimizer``, are not weights and are ignored).

    Returns:
        tuple: ``(state_dict, meta)``. ``meta`` is JSON-able: ``source`` (``'mmseg0.x'``),
        ``architecture`` (``'UperNet'``), ``backbone`` (e.g. ``'restv2_tiny'``), ``config``
        (the config that trains and tests it), ``authors_test_config`` (the same model
        tested on images resized to multiples of 32, as the authors did), ``num_classes``,
        ``dataset_meta`` (classes and palette, when the file has them) and
        ``mmseg_version`` (when it has one).

    Raises:
        ValueError: when it is not such a checkpoint, or holds a key outside the authors'
            backbone and mmseg 0.x's UPerHead/FCNHead layouts (the error names them), or its
            backbone is no released ResTv2 preset.
    """
    if not is_mmseg0x_segmentor(checkpoint):
        raise ValueError('not an mmseg 0.x segmentor with the authors\' ResTv2 backbone: '
                         'expected {"meta", "state_dict"} with decode_head.* and '
                         'backbone.stage1.* keys')
    state_dict = unwrap_checkpoint(checkpoint)
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items()
                if k.startswith('backbone.')}
    heads = OrderedDict((k, v) for k, v in state_dict.items() if _HEAD_KEYS.match(k))
    unexplained = [k for k in state_dict if not k.startswith('backbone.') and k not in heads]
    if unexplained:
        raise ValueError(f'keys outside the authors\' UperNet layout (backbone.*, mmseg 0.x '
                         f'UPerHead decode_head.* and FCNHead auxiliary_head.*): {unexplained}')
    if is_v1(backbone):
        raise ValueError('this mmseg 0.x checkpoint has a ResT v1 backbone (stem.conv1); the '
                         'authors released UperNet with ResTv2 only, and only those convert')
    # Imported here: importing rest imports this package.
    from ..rest import BACKBONES
    converted_backbone, model_name, arch = convert_model_backbone(
        backbone, 'backbone.', SOURCE, BACKBONES, out_indices=(0, 1, 2, 3))
    if arch not in CONFIGS:
        raise ValueError(f'the authors released UperNet with ResTv2-T/S/B; no config in '
                         f'configs/segmentation/ fits ResTV2 {arch!r}')
    converted = OrderedDict((f'backbone.{k}', v) for k, v in converted_backbone.items())
    converted.update(heads)

    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), Mapping) else {}
    num_classes = heads['decode_head.conv_seg.weight'].shape[0] \
        if 'decode_head.conv_seg.weight' in heads else None
    out_meta = dict(source=SOURCE, architecture='UperNet',
                    backbone=presets.preset_name(model_name, arch), config=CONFIGS[arch],
                    authors_test_config=AUTHORS_TEST_CONFIGS[arch], num_classes=num_classes)
    dataset_meta = _dataset_meta(meta)
    if dataset_meta:
        out_meta['dataset_meta'] = dataset_meta
    if meta.get('mmseg_version') is not None:
        out_meta['mmseg_version'] = str(meta['mmseg_version'])
    return converted, out_meta
