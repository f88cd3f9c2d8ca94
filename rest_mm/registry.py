"""Registration of the backbones in mmdet's and mmseg's MODELS registries (and, in mmdet's,
the RetinaNet head that post-processes as detectron2 does)."""
import importlib
from typing import List

from .rest import ResT, ResTV2

_LIBRARY_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def register_backbones() -> List[str]:
    """Register ResT and ResTV2 with every installed library (and ``LateClippingRetinaHead``
    with mmdet); returns the libraries' names.

    Each library is optional, so a user with only mmdet (or only mmseg) still gets the
    registration. Registering twice is a no-op.
    """
    registered = []
    for module_name in _LIBRARY_REGISTRIES:
        try:
            models = importlib.import_module(module_name).MODELS
        except ImportError:
            continue
        modules = [ResT, ResTV2]
        if module_name == 'mmdet.registry':
            from .dense_heads import LateClippingRetinaHead
            modules.append(LateClippingRetinaHead)
        for module in modules:
            if models.module_dict.get(module.__name__) is not module:
                models.register_module(module=module, force=True)
        registered.append(module_name.split('.')[0])
    return registered
