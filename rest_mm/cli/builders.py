"""Models built for the tools, by preset name or from a config, with random or given weights.

``tools/visualize.py`` and ``tools/export_onnx.py`` inspect a backbone on its own
(:func:`build_standalone_backbone`); ``tools/benchmark.py`` and ``tools/get_flops.py`` time
and count backbones (:func:`build_ours`) and whole models (:func:`build_config_model`, fed
:func:`data_samples`). Preset names are those of :data:`rest_mm.presets.PRESET_NAMES`.
"""
import argparse
import math
from pathlib import Path
from typing import List, Optional, Tuple, Union

from mmengine.config import Config
from torch import nn

from rest_mm.presets import PRESET_NAMES, parse_preset_name
from rest_mm.rest import BACKBONES
from rest_mm.weights import load_pretrained


def build_ours(name: str) -> nn.Module:
    """Our backbone of the preset ``name`` (e.g. ``'rest_small'``), randomly initialised."""
    model_name, arch = parse_preset_name(name)
    return BACKBONES[model_name](arch=arch)


def build_config_model(path: Union[str, Config]) -> nn.Module:
    """The whole model of the mmdet or mmseg config at ``path`` (or already loaded), with
    its library's default scope set and noted as ``model.default_scope``."""
    from mmengine.registry import init_default_scope

    import rest_mm  # noqa: F401 (registers the backbones)
    cfg = path if isinstance(path, Config) else Config.fromfile(path)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.default_scope = scope
    return model


def data_samples(model: nn.Module, batch: int, size: Tuple[int, int]) -> Optional[List]:
    """What a config-built model's ``tensor`` mode needs beside the images; None for a
    backbone."""
    scope = getattr(model, 'default_scope', None)
    if scope is None:
        return None
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size, batch_input_shape=size,
                scale_factor=(1., 1.))
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta) for _ in range(batch)]
    from mmdet.structures import DetDataSample
    return [DetDataSample(metainfo=meta) for _ in range(batch)]


def parse_size(text: str, batch: bool = False) -> Tuple[int, ...]:
    """An image size, for argparse's ``type`` (``functools.partial`` for ``batch``).

    Args:
        text (str): ``'HxW'``, e.g. ``'800x1344'``; with ``batch`` also ``'BxHxW'``.
        batch (bool): Whether a batch size may lead. Defaults to False.

    Returns:
        tuple[int]: ``(H, W)``; with ``batch``, ``(B, H, W)``, B being 1 where not given.
    """
    form, example = ('HxW or BxHxW', '333x517 or 2x200x328') if batch else ('HxW', '800x1344')
    try:
        sizes = tuple(int(v) for v in text.lower().split('x'))
    except ValueError:
        sizes = ()
    if len(sizes) not in ((2, 3) if batch else (2,)):
        raise argparse.ArgumentTypeError(f'size {text!r} must look like {example} ({form})')
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f'size {text!r} must be positive')
    return (1, *sizes) if batch and len(sizes) == 2 else sizes


def positive_int(text: str) -> int:
    """A whole number of at least 1, for argparse's ``type``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number')
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text} must be at least 1')
    return value


def positive_float(text: str) -> float:
    """A finite number above 0, for argparse's ``type``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number')
    if not (0 < value < math.inf):  # also refuses NaN
        raise argparse.ArgumentTypeError(f'{text} must be a finite number above 0')
    return value


def backbone_config(config_or_arch: str) -> Tuple[dict, str]:
    """The backbone's constructor config and a short description of where it came from.

    Args:
        config_or_arch (str): A config file whose ``model.backbone`` is a ResT/ResTV2, or
            a preset name from :data:`rest_mm.presets.PRESET_NAMES`.

    Returns:
        tuple: ``(dict with 'type' and constructor args, description)``. A config's
        ``init_cfg`` is dropped: weights come only from the checkpoint passed to
        :func:`build_standalone_backbone`, so nothing is ever downloaded.
    """
    if config_or_arch.lower() in PRESET_NAMES:
        model_type, arch = parse_preset_name(config_or_arch)
        return dict(type=model_type, arch=arch), f'{model_type}({arch!r})'
    if not Path(config_or_arch).is_file():
        raise ValueError(f'{config_or_arch!r} is neither a config file nor a preset name; '
                         f'the presets are {", ".join(PRESET_NAMES)}')
    cfg = Config.fromfile(config_or_arch)
    backbone = cfg.get('model', {}).get('backbone')
    if backbone is None or backbone.get('type') not in BACKBONES:
        found = None if backbone is None else backbone.get('type')
        raise ValueError(f'{config_or_arch}: model.backbone is {found!r}, expected one of '
                         f'{sorted(BACKBONES)}')
    backbone = backbone.to_dict()
    backbone.pop('init_cfg', None)
    arch = backbone.get('arch', 'default arch')
    arch = 'custom arch' if isinstance(arch, dict) else repr(arch)
    return backbone, f'{backbone["type"]}({arch}) from {Path(config_or_arch).name}'


def build_standalone_backbone(config_or_arch: str,
                              checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """A ResT/ResTV2 in eval mode, with weights from ``checkpoint`` (any layout the
    converter accepts) if given.

    Without a checkpoint the weights are torch's default random initialisation (the
    backbone's ``init_weights`` is not called: it would log every parameter).

    Returns:
        tuple: ``(model, description)``, the description naming the weights.
    """
    backbone_cfg, description = backbone_config(config_or_arch)
    backbone_cfg = dict(backbone_cfg)
    model = BACKBONES[backbone_cfg.pop('type')](**backbone_cfg)
    if checkpoint is None:
        description += ', random weights'
    else:
        load_pretrained(model, checkpoint)
        description += f', weights {Path(checkpoint).name}'
    return model.eval(), description
