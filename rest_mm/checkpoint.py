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
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import nn

from . import presets
from .checkpoint_files import (
    CheckpointFileError,
    allow_mmengine_checkpoints,
    download_checkpoint,
    read_local_checkpoint,
)

_WRAPPER_KEYS = ('state_dict', 'model')
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


def unwrap_checkpoint(checkpoint: Mapping) -> Mapping:
    """The state dict inside ``state_dict`` / ``model`` wrappers, however deep.

    Raises:
        ValueError: A wrapper that contains itself (``d['model'] = d``, or a longer
            cycle), which would otherwise be unwrapped for ever.
    """
    seen = set()
    while True:
        seen.add(id(checkpoint))
        key = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            return checkpoint
        checkpoint = checkpoint[key]
        if id(checkpoint) in seen:
            raise ValueError(f"the checkpoint's {key!r} entry leads back to a dict that "
                             f'contains it (a cycle); expected a state dict, possibly wrapped '
                             f"as {{'state_dict': ...}} or {{'model': ...}}")


def without_module_prefix(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """``state_dict`` without the ``module.`` that a DDP-wrapped model's keys start with."""
    return {(k[len('module.'):] if k.startswith('module.') else k): v
            for k, v in state_dict.items()}


def _strip_prefixes(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    stripped = without_module_prefix(state_dict)
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in stripped):
            return {k[len(prefix):]: v for k, v in stripped.items() if k.startswith(prefix)}
    return stripped


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
    if not _is_authors_layout(state_dict):
        return OrderedDict(state_dict)
    v1 = is_v1(state_dict)
    converted = OrderedDict()
    for key, value in state_dict.items():
        new_key = _authors_key(key, v1)
        if new_key is not None:
            converted[new_key] = value
    return converted


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


def suggest_arch(state_dict: Mapping) -> str:
    """A sentence naming the model and preset that converted weights fit."""
    model_name, preset = weights_preset(state_dict)
    if preset is not None:
        return f"these weights fit {model_name}(arch='{preset}')"
    _, found = describe_weights(state_dict)
    return (f'these weights fit {model_name} with embed_dims={found["embed_dims"]} and '
            f'depths={found["depths"]}, which is no preset: pass them in an arch dict')


def backbone_key_problems(weights: Mapping, model: nn.Module
                          ) -> Tuple[List[str], List[str], List[str]]:
    """``(unknown, missing, mis-shaped)`` keys of converted weights against ``model`` (which
    may live on the meta device: only names and shapes are read). Whole-model converters
    call it so that a backbone key no rule explains is an error at conversion, not at
    loading."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unknown = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights]
    mis_shaped = [k for k in weights if k in expected and tuple(weights[k].shape) != expected[k]]
    return unknown, missing, mis_shaped


def _listed(items: Sequence[str], most: int = 8) -> str:
    """The first ``most`` items, and how many there are when that is not all."""
    return ', '.join(items[:most]) + (f', ... ({len(items)} in all)' if len(items) > most else '')


def as_tensors(state_dict: Mapping, source: str) -> Dict[str, torch.Tensor]:
    """The values as tensors (numpy arrays, as detectron2's ``.pkl`` files hold, are
    converted); anything else is an error naming the keys."""
    tensors, others = {}, []
    for key, value in state_dict.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in 'biufc':
            # np.ascontiguousarray would turn a 0-d array (num_batches_tracked) into 1-d
            value = torch.from_numpy(value if value.flags.c_contiguous else value.copy())
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            others.append(f'{key} ({type(value).__name__})')
    if others:
        raise RuntimeError(f'{source}: values that are not tensors: {_listed(others)}; a '
                           f'state dict maps parameter names to tensors (or numpy arrays)')
    return tensors


def check_finite(state_dict: Mapping, source: str,
                 opt_out: str = "allow_non_finite=True (in a config: in the backbone's "
                                "init_cfg)") -> None:
    """Refuse weights holding NaN or Inf: a damaged file or a diverged run, which would
    otherwise load without a word (torch's CPU attention even turns NaN query rows into
    zeros, so early feature maps stay finite and hide it).

    Args:
        state_dict (Mapping): Names to tensors; values of other types are not looked at.
        source (str): The file's name, for the message.
        opt_out (str): How the caller loads anyway, for the message. Defaults to naming
            the ``allow_non_finite`` argument of the loaders.

    Raises:
        RuntimeError: Naming the tensors with non-finite values and how many each holds.
    """
    bad = []
    for key, value in state_dict.items():
        if (isinstance(value, torch.Tensor) and not value.is_meta
                and (value.is_floating_point() or value.is_complex())):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                nan = int(torch.isnan(value).sum())
                bad.append(f'{key} ({nan} NaN, {value.numel() - int(finite.sum()) - nan} Inf '
                           f'of {value.numel()})')
    if bad:
        raise RuntimeError(f'non-finite values in {len(bad)} tensor(s) of {source}: '
                           f'{_listed(bad)}; the file is damaged or from a diverged run. To '
                           f'use it anyway, pass {opt_out}.')


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
        RuntimeError: naming every missing, unexpected or mis-shaped key, with the
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
        raise RuntimeError(f'{source} holds no ResT/ResTV2 backbone weights (no '
                           f'stages.N.blocks.M.attn.q/kv weights after conversion; first '
                           f'keys: {first}): pass a ResT/ResTV2 checkpoint')
    missing = [k for k in own if k not in state_dict and not is_output_norm(k, fresh)]
    unexpected = [k for k in state_dict
                  if k not in own and not is_output_norm(k, range(presets.NUM_STAGES))]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mismatched)):
            if keys:
                problems.append(f'{title}: {_listed(keys)}')
        raise RuntimeError(f'{source} does not fit {type(model).__name__}('
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


def read_checkpoint(path: str, map_location: Optional[str] = 'cpu',
                    mmap: bool = False) -> Mapping:
    """Read a checkpoint file (or URL), verified, with a clear error for a bad one.

    A local file is read by :func:`rest_mm.checkpoint_files.read_local_checkpoint`: a
    torch zip file's CRC-32s are all checked before it is unpickled (damaged bytes are an
    error, not wrong weights); a legacy (non-zip) torch file and a plain pickle carry no
    checksum, so damage inside their tensors cannot be detected; a plain pickle (a
    detectron2 ``.pkl`` model) may hold only numpy arrays and builtin containers, whose
    values stay numpy arrays. torch files are unpickled with an allow-list (tensors, numpy,
    builtin containers and the types mmengine's training checkpoints pickle, so a detector
    or segmentor trained with this repo reads too), the same on every supported torch.
    http(s) URLs are downloaded once (:func:`rest_mm.checkpoint_files.download_checkpoint`)
    and read as local files; other schemes (``open-mmlab://``, ``s3://``, ...) are read by
    mmengine's loader, through ``torch.load``, which is weights-only from torch 2.6 only.

    Args:
        path (str): A file path or URL.
        map_location (str, optional): Where tensors go. Defaults to ``'cpu'``.
        mmap (bool): Map a zip file's tensor data instead of reading it (for a look at
            keys and shapes). Defaults to False.

    Raises:
        FileNotFoundError: No such file, or a directory.
        RuntimeError: A damaged or unreadable file, or one that holds no dict.
    """
    allow_mmengine_checkpoints()
    if path.startswith(('http://', 'https://')):
        path = download_checkpoint(path)
    remote = '://' in path
    if not remote and osp.isdir(path):
        raise FileNotFoundError(f'checkpoint {path!r} is a directory, not a file; pass the '
                                f'checkpoint file inside it')
    if not remote and not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        if remote:
            checkpoint = CheckpointLoader.load_checkpoint(path, map_location=map_location)
        else:
            checkpoint = read_local_checkpoint(path, map_location=map_location, mmap=mmap)
    except FileNotFoundError as error:
        raise FileNotFoundError(f'checkpoint {path!r} does not exist') from error
    except CheckpointFileError:
        raise
    except Exception as error:  # torch raises several unrelated types for bad files
        raise RuntimeError(f'checkpoint {path!r} could not be read ({type(error).__name__}: '
                           f'{error}); expected a file written by torch.save holding a '
                           f'state dict') from error
    if not isinstance(checkpoint, Mapping):
        raise RuntimeError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, '
                           f'expected a state dict or a dict wrapping one')
    return checkpoint


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
            raise RuntimeError(f'checkpoint {path!r} has no key starting with {prefix!r}')
    load_converted_state_dict(model, convert_checkpoint(checkpoint), source=path,
                              allow_non_finite=allow_non_finite)


def check_model_fits(model: nn.Module, checkpoint: Mapping, source: str,
                     allow_missing: Sequence[str] = ()) -> None:
    """Refuse whole-model weights that would leave part of ``model`` as initialised.

    mmengine's Runner and the mmdet/mmseg inferencers load non-strictly and only log what
    did not fit, so a checkpoint of another model (or a backbone-only file) would run,
    and report metrics, with part of the model random. ``tools/test.py``,
    ``tools/train.py`` (``load_from``, ``--resume``), ``tools/demo.py`` and
    ``tools/export_onnx.py`` call this first.

    Args:
        model (nn.Module): The detector or segmentor (a DDP wrapper is looked through).
        checkpoint (Mapping): The loaded file: ``{'state_dict': ...}`` as the Runner
            writes it, or a bare state dict. A leading ``module.`` is ignored, as the
            Runner ignores it.
        source (str): The file's name, for the message.
        allow_missing (Sequence[str]): Partial loading, asked for by name: model keys
            under these prefixes may be absent or mis-shaped (they keep their
            initialisation) and checkpoint keys under them may be left over. Defaults to
            none.

    Raises:
        RuntimeError: Naming the missing, unexpected and mis-shaped keys (and values that
            are not tensors), with a hint when the file is of another kind.
    """
    from mmengine.model import is_model_wrapper
    if is_model_wrapper(model):
        model = model.module
    state_dict = without_module_prefix(checkpoint.get('state_dict', checkpoint))
    allowed = tuple(allow_missing)
    own = model.state_dict()
    not_tensors = [f'{k} ({type(v).__name__})' for k, v in state_dict.items()
                   if not isinstance(v, torch.Tensor) and not k.startswith(allowed)]
    missing = [k for k in own if k not in state_dict and not k.startswith(allowed)]
    unexpected = [k for k in state_dict if k not in own and not k.startswith(allowed)]
    mismatched = [f'{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})'
                  for k in own if k in state_dict and not k.startswith(allowed)
                  and isinstance(state_dict[k], torch.Tensor)
                  and state_dict[k].shape != own[k].shape]
    if not (not_tensors or missing or unexpected or mismatched):
        return
    if any(k.startswith('backbone.bottom_up.') for k in state_dict):
        raise RuntimeError(
            f'{source} is a detectron2 model (keys under backbone.bottom_up.), not an '
            f'mmdet one: convert it first with `python tools/convert_weights.py {source} '
            f'OUT.pth` and pass OUT.pth')
    if not any(k.startswith('backbone.') for k in state_dict):
        raise RuntimeError(
            f'{source} holds no detector/segmentor weights (no "backbone." keys): it looks '
            f'like a backbone or ImageNet checkpoint. A checkpoint trained with the config is '
            f'needed; to start training from backbone weights, set '
            f"model.backbone.init_cfg=dict(type='Pretrained', checkpoint='{source}').")
    details = []
    for title, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped', mismatched), ('not tensors', not_tensors)):
        if keys:
            shown = ', '.join(keys[:4]) + (', ...' if len(keys) > 4 else '')
            details.append(f'{len(keys)} {title} ({shown})')
    raise RuntimeError(f'{source} does not fit the {type(model).__name__} built from the '
                       f'config: {"; ".join(details)}. Was it trained with this config?')


def load_whole_model(model: nn.Module, path: str) -> None:
    """Load a detector's or segmentor's checkpoint into ``model``: the file verified
    (:func:`read_checkpoint`) and refused unless it fits the whole model
    (:func:`check_model_fits`).

    Raises:
        FileNotFoundError: No such file.
        RuntimeError: A damaged file, or one that does not fit, naming the keys.
    """
    weights = read_checkpoint(path)
    check_model_fits(model, weights, path)
    model.load_state_dict(without_module_prefix(weights.get('state_dict', weights)))
