"""From the authors' checkpoints to ours, and strict loading.

``convert_checkpoint`` is pure and idempotent: it accepts the released ImageNet files
(``{"model": state_dict}``, classifier included), raw state dicts, ``state_dict``
wrappers, ``module.`` prefixes, the authors' detectron2 conversions
(``backbone.bottom_up.``) and our own detectors and segmentors (``backbone.``), and
returns backbone weights under our key names. Converting its own output changes nothing.

``load_pretrained`` refuses to load partially: the only keys that may be absent or left
over are the classifier head (dropped by the converter) and the output norms that the
dense-prediction releases add fresh.
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import nn

from .runtime import allow_mmengine_checkpoints

_WRAPPER_KEYS = ('state_dict', 'model')
# Whole-model checkpoints keep the backbone under one of these prefixes, most specific first.
_BACKBONE_PREFIXES = ('backbone.bottom_up.', 'backbone.')
_RENAMES = (
    (re.compile(r'^patch_embed_(\d)\.'), lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (re.compile(r'^patch_(\d)\.'), lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (re.compile(r'^stage(\d)\.(\d+)\.'), lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'),
    (re.compile(r'\.attn\.up\.0\.'), lambda m: '.attn.up_conv.'),
)
_OUTPUT_NORM = re.compile(r'^norm(\d)\.')


def _unwrap(checkpoint: Mapping) -> Mapping:
    while True:
        inner = next((checkpoint[k] for k in _WRAPPER_KEYS
                      if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            return checkpoint
        checkpoint = inner


def _strip_prefixes(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    stripped = {(k[len('module.'):] if k.startswith('module.') else k): v
                for k, v in state_dict.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in stripped):
            return {k[len(prefix):]: v for k, v in stripped.items() if k.startswith(prefix)}
    return stripped


def is_v1(state_dict: Mapping) -> bool:
    """Whether converted or authors' weights are ResT v1 (v1's stem has ``conv1``)."""
    return any(k.startswith('stem.conv1.') for k in state_dict)


def convert_checkpoint(checkpoint: Mapping) -> 'OrderedDict[str, torch.Tensor]':
    """Backbone weights under our key names, from any supported checkpoint layout.

    Args:
        checkpoint (Mapping): A loaded checkpoint or state dict.

    Returns:
        OrderedDict: The backbone's tensors. The classifier ``head`` is dropped; the
        classifier ``norm`` becomes v1's stage-4 output norm ``norm3`` and is dropped
        for v2, whose dense-prediction release does not use it.
    """
    state_dict = _strip_prefixes(_unwrap(checkpoint))
    v1 = is_v1(state_dict)
    converted = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('head.'):
            continue
        if key.startswith('norm.'):
            if not v1:
                continue
            key = 'norm3.' + key[len('norm.'):]
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted


def describe_weights(state_dict: Mapping) -> Tuple[str, dict]:
    """The model class and the ``embed_dims`` / ``depths`` that converted weights hold."""
    v1 = is_v1(state_dict)
    stem_out = 'stem.conv3.weight' if v1 else 'stem.proj.6.weight'
    down = 'conv' if v1 else 'proj'
    dims = [state_dict[stem_out].shape[0]] if stem_out in state_dict else [None]
    for i in range(1, 4):
        weight = state_dict.get(f'stages.{i}.downsample.{down}.weight')
        dims.append(None if weight is None else weight.shape[0])
    blocks = {tuple(k.split('.')[1:4:2]) for k in state_dict if re.match(r'stages\.\d\.blocks\.', k)}
    depths = [sum(1 for stage, _ in blocks if stage == str(i)) for i in range(4)]
    return ('ResT' if v1 else 'ResTV2'), dict(embed_dims=tuple(dims), depths=tuple(depths))


def suggest_arch(state_dict: Mapping) -> str:
    """A sentence naming the model and preset that converted weights fit."""
    from .rest import ResT, ResTV2
    model_name, found = describe_weights(state_dict)
    zoo = (ResT if model_name == 'ResT' else ResTV2).arch_zoo
    for name, arch in zoo.items():
        if (tuple(arch['embed_dims']) == found['embed_dims']
                and tuple(arch['depths']) == found['depths']):
            return f"these weights fit {model_name}(arch='{name}')"
    return (f'these weights fit {model_name} with embed_dims={found["embed_dims"]} and '
            f'depths={found["depths"]}, which is no preset: pass them in an arch dict')


def load_converted_state_dict(model: nn.Module, state_dict: Mapping, source: str = 'checkpoint'):
    """Load converted weights, refusing anything but fresh output norms to differ.

    Raises:
        RuntimeError: naming every missing, unexpected or mis-shaped key, with the
            variant the weights would fit.
    """
    own = model.state_dict()
    fresh = {i for i in getattr(model, 'fresh_norm_indices', ())}

    def is_output_norm(key, allowed):
        match = _OUTPUT_NORM.match(key)
        return bool(match) and int(match[1]) in allowed

    if not state_dict:
        raise RuntimeError(f'{source} holds no ResT/ResTV2 backbone weights')
    missing = [k for k in own if k not in state_dict and not is_output_norm(k, fresh)]
    unexpected = [k for k in state_dict if k not in own and not is_output_norm(k, range(4))]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mismatched)):
            if keys:
                shown = ', '.join(keys[:8]) + (f', ... ({len(keys)} in all)' if len(keys) > 8 else '')
                problems.append(f'{title}: {shown}')
        raise RuntimeError(f'{source} does not fit {type(model).__name__}('
                           f'embed_dims={tuple(model.embed_dims)}, depths='
                           f'{tuple(model.arch["depths"])}): ' + '; '.join(problems) +
                           f'. {suggest_arch(state_dict)}.')
    loadable = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    fresh_keys = sorted({k.split('.')[0] for k in own if k not in state_dict})
    print_log(f'Loaded {len(loadable)} tensors into {type(model).__name__} from {source}'
              + (f'; fresh output norms: {", ".join(fresh_keys)}' if fresh_keys else ''),
              logger='current')


def read_checkpoint(path: str, map_location: Optional[str] = 'cpu') -> Mapping:
    """Read a checkpoint file (or URL) with a clear error for a missing or corrupt one.

    Loading stays ``weights_only``; the types that mmengine's training checkpoints pickle
    are allow-listed, so a detector or segmentor trained with this repo reads too.
    """
    allow_mmengine_checkpoints()
    try:
        checkpoint = CheckpointLoader.load_checkpoint(path, map_location=map_location)
    except FileNotFoundError as error:
        raise FileNotFoundError(f'checkpoint {path!r} does not exist') from error
    except Exception as error:  # torch raises several unrelated types for bad files
        raise RuntimeError(f'checkpoint {path!r} could not be read ({type(error).__name__}: '
                           f'{error}); expected a file written by torch.save holding a '
                           f'state dict') from error
    if not isinstance(checkpoint, Mapping):
        raise RuntimeError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, '
                           f'expected a state dict or a dict wrapping one')
    return checkpoint


def load_pretrained(model: nn.Module, path: str, prefix: Optional[str] = None):
    """Convert and strictly load the checkpoint at ``path`` into a ResT/ResTV2 model.

    Args:
        model (nn.Module): A ``ResT`` or ``ResTV2``.
        path (str): Checkpoint path or URL.
        prefix (str, optional): Take only the keys under this prefix (as mmengine's
            ``Pretrained`` init does), e.g. ``'teacher.backbone.'``. The usual prefixes
            are found without it.
    """
    try:
        checkpoint = _unwrap(read_checkpoint(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}: put the authors' ImageNet weights (or a converted file) there, point "
            f'the backbone at them (e.g. --cfg-options model.backbone.init_cfg.checkpoint='
            f'PATH), or set model.backbone.init_cfg=None to train from scratch') from error
    if prefix:
        checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        if not checkpoint:
            raise RuntimeError(f'checkpoint {path!r} has no key starting with {prefix!r}')
    load_converted_state_dict(model, convert_checkpoint(checkpoint), source=path)
