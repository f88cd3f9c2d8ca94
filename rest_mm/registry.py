"""Registration of ResT and ResTV2 in the MODELS registry of mmdet and of mmseg."""
import importlib

from .rest import ResT, ResTV2

_LIBRARY_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def register_backbones() -> None:
    """Register ResT and ResTV2 with every installed library.

    Each library is optional, so a user with only mmdet (or only mmseg) still gets the
    registration. Registering twice is a no-op.
    """
    for module_name in _LIBRARY_REGISTRIES:
        try:
            models = importlib.import_module(module_name).MODELS
        except ImportError:
            continue
        for module in (ResT, ResTV2):
            if models.module_dict.get(module.__name__) is not module:
                models.register_module(module=module, force=True)
