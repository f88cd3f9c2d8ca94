"""ResT and ResTv2 backbones for mmdetection 3.x and mmsegmentation 1.x.

Importing the package registers ``ResT`` and ``ResTV2`` in the MODELS registry of each
of mmdet and mmseg that is installed, so configs can say ``type='ResT'`` after
``custom_imports=dict(imports=['rest_mm'])``; it registers nothing else. ``rest_mm.cli``
holds what the command-line tools need and is imported by them only.
"""
from .presets import ARCH_ZOOS, PRESET_NAMES
from .registry import register_backbones
from .rest import ResT, ResTV2
from .weights import convert_checkpoint, load_pretrained

__version__ = '0.1.0'
__all__ = ['ARCH_ZOOS', 'PRESET_NAMES', 'ResT', 'ResTV2', 'convert_checkpoint', 'load_pretrained']

register_backbones()
