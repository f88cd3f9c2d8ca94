"""ResT and ResTv2 backbones for mmdetection 3.x and mmsegmentation 1.x.

Importing the package registers ``ResT`` and ``ResTV2`` in the MODELS registry of each
of mmdet and mmseg that is installed, so configs can say ``type='ResT'`` after
``custom_imports=dict(imports=['rest_mm'])``.
"""
from .checkpoint import convert_checkpoint, load_pretrained
from .registry import register_backbones
from .rest import ResT, ResTV2

__version__ = '0.1.0'
__all__ = ['ResT', 'ResTV2', 'convert_checkpoint', 'load_pretrained', 'register_backbones']

register_backbones()
