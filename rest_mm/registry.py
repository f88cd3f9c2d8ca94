"""Registration of the backbones in mmdet's and mmseg's MODELS registries."""
import importlib
from typing import List

from .rest import ResT, ResTV2

_LIBRARY_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def register_backbones() -> List[str]:
    """Register ResT and ResTV2 with every installed library; returns their names.

    Each library is optional, so a user with only mmdet (or only mmseg) still gets the
    registration. Registering twice is a no-op.
    """
    registered = []
    for module_name in _LIBRARY_REGISTRIES:
        try:
            models = importlib.import_module(module_name).MODELS
        except ImportError:
            continue
        for backbone in (ResT, ResTV2):
            if models.module_dict.get(backbone.__name__) is not backbone:
                models.register_module(module=backbone, force=True)
        registered.append(module_name.split('.')[0])
    return registered
