"""From the authors' checkpoints to ours, and strict loading.

``convert_checkpoint`` is pure and idempotent: it accepts the released ImageNet files
(``{"model": state_dict}``, classifier included), raw state dicts, ``state_dict``
wrappers, ``module.`` prefixes, the authors' detectron2 conversions
(``backbone.bottom_up.``) and our own detectors and segmentors (``backbone.``), and
returns backbone weights under our key names. Converting its own output changes nothing.

``convert_model_backbone`` is its strict form for the backbones of the whole detectors and
segmentors the authors released: every key accounted for, the preset named.

``load_pretrained`` refuses to load partially: the only keys that may be absent or left
over are the classifier head (dropped by the converter) and the output norms that the
dense-prediction releases add fresh.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from .. import presets
from .files import read_checkpoint
from .state_dicts import CheckpointError, as_tensors, check_finite, listed, unwrap_checkpoint

# Whole-model checkpoints keep the backbone under one of these prefixes, most specific first.
_BACKBONE_PREFIXES = ('backbone.bottom_up.', 'backbone.')
_RENAMES = (
    (re.compile(r'^patch_embed_(\d)\.'), lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (re.compile(r'^patch_(\d)\.'), lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (re.compile(r'^stage(\d)\.(\d+)\.'), lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'),
    (re.compile(r'\.attn\.up\.0\.'), lambda m: '.attn.up_conv.'),
)
# The authors number output norms from 1: v1 detectron2 `norm1`..`norm3` (stages 1-3, its
# stage-4 norm is the ImageNet `norm`), v2 detectron2 `norm_1.0`..`norm_4.0` (a LayerNorm
# inside a Sequential), v2 mmseg 0.x `norm_1`..`norm_4`. Ours are `norm0`..`norm3`.
_AUTHORS_OUTPUT_NORM = re.compile(r'^norm_?([1-4])\.(?:0\.)?')
_OUTPUT_NORM = re.compile(r'^norm(\d)\.')
# Every ResT/ResTV2 block's attention has these (converted names); other models' do not.
_REST_ATTENTION_KEY = re.compile(r'^stages\.\d\.blocks\.\d+\.attn\.(q|kv)\.weight$')


def _strip_prefixes(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def is_v1(state_dict: Mapping) -> bool:
    """Whether converted or authors' weights are ResT v1 (v1's stem has ``conv1``)."""
    return any(k.startswith('stem.conv1.') for k in state_dict)


def _is_authors_layout(state_dict: Mapping) -> bool:
    """The authors name stages ``stage1``..``stage4``; ours are ``stages.0``..``stages.3``."""
    return not any(k.startswith('stages.') for k in state_dict)


def _authors_key(key: str, v1: bool) -> Optional[str]:
    """One of the authors' backbone keys under our name; None for the classifier."""
    if key.startswith('head.') or (key.startswith('norm.') and not v1):
        return None
    if key.startswith('norm.'):
        return 'norm3.' + key[len('norm.'):]
    match = _AUTHORS_OUTPUT_NORM.match(key)
    if match:
        return f'norm{int(match[1]) - 1}.' + key[match.end():]
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def convert_checkpoint(checkpoint: Mapping) -> 'OrderedDict[str, torch.Tensor]':
    """Backbone weights under our key names, from any supported checkpoint layout.

    Args:
        checkpoint (Mapping): A loaded checkpoint or state dict.

    Returns:
        OrderedDict: The backbone's tensors. The classifier ``head`` is dropped; the
        classifier ``norm`` becomes v1's stage-4 output norm ``norm3`` and is dropped
        for v2, whose dense-prediction releases do not use it. The authors' trained output
        norms (detectron2 and mmseg 0.x releases, numbered from 1) become ``norm0``..
        ``norm3``. Weights already in our layout are returned as they are.
    """
    state_dict = _strip_prefixes(unwrap_checkpoint(checkpoint))
    return OrderedDict((ours, state_dict[theirs]) for theirs, ours in _our_keys(state_dict)
                       if ours is not None)


def _our_keys(state_dict: Mapping) -> List[Tuple[str, Optional[str]]]:
    """``(key, our name for it)`` for each key of backbone weights, in order; the name is
    None for a key that the converter drops (the classifier's)."""
    if not _is_authors_layout(state_dict):
        return [(key, key) for key in state_dict]
    v1 = is_v1(state_dict)
    return [(key, _authors_key(key, v1)) for key in state_dict]


def describe_weights(state_dict: Mapping) -> Tuple[str, dict]:
    """The model class and the ``embed_dims`` / ``depths`` that converted weights hold."""
    v1 = is_v1(state_dict)
    stem_out = 'stem.conv3.weight' if v1 else 'stem.proj.6.weight'
    down = 'conv' if v1 else 'proj'
    dims = [state_dict[stem_out].shape[0]] if stem_out in state_dict else [None]
    for i in range(1, presets.NUM_STAGES):
        weight = state_dict.get(f'stages.{i}.downsample.{down}.weight')
        dims.append(None if weight is None else weight.shape[0])
    blocks = {tuple(k.split('.')[1:4:2]) for k in state_dict
              if re.match(r'stages\.\d\.blocks\.', k)}
    depths = [sum(1 for stage, _ in blocks if stage == str(i)) for i in range(presets.NUM_STAGES)]
    return ('ResT' if v1 else 'ResTV2'), dict(embed_dims=tuple(dims), depths=tuple(depths))


def weights_preset(state_dict: Mapping) -> Tuple[str, Optional[str]]:
    """The model class converted weights are for, and the preset they fit (None: none)."""
    model_name, found = describe_weights(state_dict)
    return model_name, presets.matching_preset(model_name, found['embed_dims'], found['depths'])


def _no_preset(state_dict: Mapping) -> str:
    """The sentence for converted weights that fit no preset."""
    model_name, found = describe_weights(state_dict)
    return (f'these weights fit {model_name} with embed_dims={found["embed_dims"]} and '
            f'depths={found["depths"]}, which is no preset')


def suggest_arch(state_dict: Mapping) -> str:
    """A sentence naming the model and preset that converted weights fit."""
    model_name, preset = weights_preset(state_dict)
    if preset is not None:
        return f"these weights fit {model_name}(arch='{preset}')"
    return f'{_no_preset(state_dict)}: pass them in an arch dict'


def backbone_key_problems(weights: Mapping, model: nn.Module
                          ) -> Tuple[List[str], List[str], List[str]]:
    """``(unknown, missing, mis-shaped)`` keys of converted weights against ``model`` (which
    may live on the meta device: only names and shapes are read)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unknown = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights]
    mis_shaped = [k for k in weights if k in expected and tuple(weights[k].shape) != expected[k]]
    return unknown, missing, mis_shaped


def output_norm_indices(weights: Mapping) -> Tuple[int, ...]:
    """The stages whose output norms converted weights hold, in order."""
    return tuple(sorted({int(m[1]) for m in map(_OUTPUT_NORM.match, weights) if m}))


def convert_model_backbone(backbone: Mapping, prefix: str, source: str,
                           backbones: Mapping[str, Callable[..., nn.Module]],
                           out_indices: Optional[Tuple[int, ...]] = None
                           ) -> Tuple['OrderedDict[str, torch.Tensor]', str, str]:
    """The backbone of one of the authors' whole models (a detector or a segmentor),
    converted, with every key accounted for: an error at conversion, not at loading.

    A whole model holds no classifier, so a key that the converter would drop is as
    unexplained as one that the model of the preset lacks.

    Args:
        backbone (Mapping): The authors' backbone keys, with ``prefix`` removed.
        prefix (str): Where the file keeps the backbone (``'backbone.bottom_up.'``), so that
            messages name keys as the file does.
        source (str): The kind of file, for messages (``'detectron2'``).
        backbones (Mapping): ``rest_mm.rest.BACKBONES``, the model classes by name (passed
            in: rest imports this module).
        out_indices (tuple[int], optional): The stages whose output norms the weights must
            hold. Defaults to those they hold.

    Returns:
        tuple: ``(weights, model class name, arch)``, e.g. ``(weights, 'ResTV2', 'tiny')``.

    Raises:
        ValueError: The weights fit no preset, or hold a key that no rule explains, or lack
            or mis-shape one that the preset's model has.
    """
    renamed = _our_keys(backbone)
    weights = OrderedDict((ours, backbone[theirs]) for theirs, ours in renamed
                          if ours is not None)
    origins = {ours: prefix + theirs for theirs, ours in renamed if ours is not None}
    model_name, arch = weights_preset(weights)
    if arch is None:
        raise ValueError(f'the {source} backbone: {_no_preset(weights)}')
    if out_indices is None:
        out_indices = output_norm_indices(weights)
    with torch.device('meta'):
        model = backbones[model_name](arch=arch, out_indices=out_indices)
    unknown, missing, mis_shaped = backbone_key_problems(weights, model)
    unknown = [prefix + theirs for theirs, ours in renamed if ours is None] + [
        origins[k] for k in unknown]
    if unknown or missing or mis_shaped:
        raise ValueError(
            f'the {source} backbone does not fit {model_name}(arch={arch!r}, out_indices='
            f'{out_indices}): unexplained keys {unknown}, missing (our names) '
            f'{["backbone." + k for k in missing]}, shape mismatches '
            f'{[f"{origins[k]} {tuple(weights[k].shape)}" for k in mis_shaped]}')
    return weights, model_name, arch


def load_converted_state_dict(model: nn.Module, state_dict: Mapping, source: str = 'checkpoint',
                              allow_non_finite: bool = False):
    """Load converted weights, refusing anything but fresh output norms to differ.

    Args:
        model (nn.Module): A ``ResT`` or ``ResTV2``.
        state_dict (Mapping): Weights under our key names (:func:`convert_checkpoint`).
        source (str): Where they came from, for messages. Defaults to ``'checkpoint'``.
        allow_non_finite (bool): Load weights holding NaN or Inf instead of refusing
            them (:func:`check_finite`). Defaults to False.

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key, with the
            variant the weights would fit; or naming values that are not tensors, or
            tensors with non-finite values; or saying that the weights are of no
            ResT/ResTV2 at all.
    """
    own = model.state_dict()
    fresh = {i for i in getattr(model, 'fresh_norm_indices', ())}

    def is_output_norm(key, allowed):
        match = _OUTPUT_NORM.match(key)
        return bool(match) and int(match[1]) in allowed

    state_dict = as_tensors(state_dict, source)
    if not any(_REST_ATTENTION_KEY.match(k) for k in state_dict):
        first = ', '.join(list(state_dict)[:5]) or 'none'
        raise CheckpointError(f'{source} holds no ResT/ResTV2 backbone weights (no '
                              f'stages.N.blocks.M.attn.q/kv weights after conversion; first '
                              f'keys: {first}): pass a ResT/ResTV2 checkpoint')
    unexpected, missing, mis_shaped = backbone_key_problems(state_dict, model)
    missing = [k for k in missing if not is_output_norm(k, fresh)]
    unexpected = [k for k in unexpected if not is_output_norm(k, range(presets.NUM_STAGES))]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}'
                  for k in mis_shaped]
    if missing or unexpected or mismatched:
        problems = []
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mismatched)):
            if keys:
                problems.append(f'{title}: {listed(keys)}')
        raise CheckpointError(f'{source} does not fit {type(model).__name__}('
                              f'embed_dims={tuple(model.embed_dims)}, depths='
                              f'{tuple(model.arch["depths"])}): ' + '; '.join(problems) +
                              f'. {suggest_arch(state_dict)}.')
    loadable = {k: v for k, v in state_dict.items() if k in own}
    if not allow_non_finite:
        check_finite(loadable, source)
    model.load_state_dict(loadable, strict=False)
    fresh_keys = sorted({k.split('.')[0] for k in own if k not in state_dict})
    print_log(f'Loaded {len(loadable)} tensors into {type(model).__name__} from {source}'
              + (f'; fresh output norms: {", ".join(fresh_keys)}' if fresh_keys else ''),
              logger='current')


def load_pretrained(model: nn.Module, path: str, prefix: Optional[str] = None,
                    allow_non_finite: bool = False):
    """Convert and strictly load the checkpoint at ``path`` into a ResT/ResTV2 model.

    Args:
        model (nn.Module): A ``ResT`` or ``ResTV2``.
        path (str): Checkpoint path or URL.
        prefix (str, optional): Take only the keys under this prefix (as mmengine's
            ``Pretrained`` init does), e.g. ``'teacher.backbone.'``. The usual prefixes
            are found without it.
        allow_non_finite (bool): Load weights holding NaN or Inf instead of refusing
            them (in a config: ``init_cfg=dict(type='Pretrained', checkpoint=PATH,
            allow_non_finite=True)``). Defaults to False.
    """
    try:
        checkpoint = unwrap_checkpoint(read_checkpoint(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}: put the authors' ImageNet weights (or a converted file) there, point "
            f'the backbone at them (e.g. --cfg-options model.backbone.init_cfg.checkpoint='
            f'PATH), or set model.backbone.init_cfg=None to train from scratch') from error
    if prefix:
        checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        if not checkpoint:
            raise CheckpointError(f'checkpoint {path!r} has no key starting with {prefix!r}')
    load_converted_state_dict(model, convert_checkpoint(checkpoint), source=path,
                              allow_non_finite=allow_non_finite)
