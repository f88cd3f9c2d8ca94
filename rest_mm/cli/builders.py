"""A backbone on its own, outside any detector or segmentor, for the inspection tools.

``tools/visualize.py`` and ``tools/export_onnx.py`` take either one of our configs (the
backbone is read from it) or a preset name such as ``rest_small`` or ``restv2_tiny``, and
optional weights in any layout the converter accepts: the authors' ImageNet release, a
converted file, or a whole detector/segmentor checkpoint trained with this repo.
"""
from pathlib import Path
from typing import Optional, Tuple

from mmengine.config import Config
from torch import nn

from .checkpoint import load_pretrained
from .rest import ResT, ResTV2

BACKBONES = {'ResT': ResT, 'ResTV2': ResTV2}
# Preset names: 'rest_' + a ResT arch or 'restv2_' + a ResTV2 arch.
ARCH_NAMES = tuple([f'rest_{arch}' for arch in ResT.arch_zoo] +
                   [f'restv2_{arch}' for arch in ResTV2.arch_zoo])


def backbone_config(config_or_arch: str) -> Tuple[dict, str]:
    """The backbone's constructor config and a short description of where it came from.

    Args:
        config_or_arch (str): A config file whose ``model.backbone`` is a ResT/ResTV2, or
            a preset name from :data:`ARCH_NAMES`.

    Returns:
        tuple: ``(dict with 'type' and constructor args, description)``. A config's
        ``init_cfg`` is dropped: weights come only from the checkpoint passed to
        :func:`build_standalone_backbone`, so nothing is ever downloaded.
    """
    name = config_or_arch.lower()
    if name in ARCH_NAMES:
        model_type, arch = ('ResTV2', name[len('restv2_'):]) if name.startswith('restv2_') \
            else ('ResT', name[len('rest_'):])
        return dict(type=model_type, arch=arch), f'{model_type}({arch!r})'
    if not Path(config_or_arch).is_file():
        raise ValueError(f'{config_or_arch!r} is neither a config file nor a preset name; '
                         f'the presets are {", ".join(ARCH_NAMES)}')
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
    """Build a ResT/ResTV2 in eval mode, with weights from ``checkpoint`` if given.

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
