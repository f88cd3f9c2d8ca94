"""Checks that the tools run on whole-model checkpoints before they use them."""
from typing import Mapping, Sequence

import numpy as np
import torch
from mmengine.model import is_model_wrapper
from torch import nn

from rest_mm.cli import errors
from rest_mm.weights.files import read_checkpoint
from rest_mm.weights.state_dicts import CheckpointError, unwrap_checkpoint

# mmengine's Runner loads a file's `state_dict` entry, or the file itself when it has none.
RUNNER_WRAPPER_KEYS = ('state_dict',)


def check_model_fits(model: nn.Module, checkpoint: Mapping, source: str,
                     allow_missing: Sequence[str] = ()) -> None:
    """Refuse whole-model weights that would leave part of ``model`` as initialised.

    mmengine's Runner and the mmdet/mmseg inferencers load non-strictly and only log what
    did not fit, so a checkpoint of another model (or a backbone-only file) would run,
    and report metrics, with part of the model random.

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
        CheckpointError: Naming the missing, unexpected and mis-shaped keys (and values that
            are not tensors), with a hint when the file is of another kind.
    """
    if is_model_wrapper(model):
        model = model.module
    state_dict = unwrap_checkpoint(checkpoint, wrappers=RUNNER_WRAPPER_KEYS)
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
        raise CheckpointError(
            f'{source} is a detectron2 model (keys under backbone.bottom_up.), not an '
            f'mmdet one: convert it first with `python tools/convert_weights.py {source} '
            f'OUT.pth` and pass OUT.pth')
    if not any(k.startswith('backbone.') for k in state_dict):
        raise CheckpointError(
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
    raise CheckpointError(f'{source} does not fit the {type(model).__name__} built from the '
                          f'config: {"; ".join(details)}. Was it trained with this config?')


def load_whole_model(model: nn.Module, path: str, target: str) -> None:
    """Load a detector's or segmentor's checkpoint into ``model``: the file verified
    (:func:`read_checkpoint`) and refused unless it fits the whole model
    (:func:`check_model_fits`).

    Args:
        model (nn.Module): The detector or segmentor.
        path (str): The checkpoint file.
        target (str): What ``model`` is, for the message (``'the segmentor of CONFIG (a
            whole-segmentor checkpoint is needed)'``).

    Raises:
        errors.UserError: ``'PATH does not load into TARGET: WHY'``, for a missing or
            damaged file or one that does not fit (the reason names the keys).
    """
    try:
        weights = read_checkpoint(path)
        check_model_fits(model, weights, path)
    except (FileNotFoundError, CheckpointError) as error:
        raise errors.UserError(f'{path} does not load into {target}: {error}') from error
    model.load_state_dict(unwrap_checkpoint(weights, wrappers=RUNNER_WRAPPER_KEYS))


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
