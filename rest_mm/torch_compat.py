"""What differs between the torch releases rest_mm supports (2.1 to 2.14), in one place.

Each helper uses the newest API where it exists and the older spelling of the same thing
otherwise; a feature that an old torch really lacks raises :class:`TorchVersionError`
naming the version it needs, never an ``AttributeError`` from deep inside a model.
"""
import inspect
import warnings
from typing import Any, Dict, Tuple

import torch

#: The oldest and newest torch the test suite runs on (``make test``); setup.cfg states the
#: same range.
TESTED_TORCH_RANGE = ('2.1', '2.14')


class TorchVersionError(RuntimeError):
    """A feature that the installed torch does not have."""


def torch_version() -> Tuple[int, int]:
    """The installed torch's (major, minor), e.g. ``(2, 1)`` for ``2.1.2+cu121``."""
    major, minor = torch.__version__.split('+')[0].split('.')[:2]
    return int(major), int(minor)


def require_torch(version: Tuple[int, int], feature: str) -> None:
    """Raise :class:`TorchVersionError` unless torch is at least ``version``."""
    if torch_version() < version:
        raise TorchVersionError(
            f'{feature} needs torch >= {version[0]}.{version[1]}; this is torch '
            f'{torch.__version__}. Upgrade torch, or do without {feature}')


def load_defaults_to_weights_only() -> bool:
    """Whether ``torch.load`` without ``weights_only`` restricts what it unpickles.

    From torch 2.6 it does (only tensors and what ``torch.serialization.add_safe_globals``
    allows, given as objects or as ``(object, 'module.name')`` pairs); before, it unpickles
    anything, so a type needs no allow-listing there.
    """
    return torch_version() >= (2, 6)


# The functions torch.save names to rebuild tensors and parameters (torch/_utils.py), oldest
# first; a torch has the ones its own files use. _rebuild_device_tensor_from_numpy and
# _rebuild_device_tensor_from_cpu_tensor are torch's own helpers for tensors of devices
# without storages; the numpy arrays they take must be allowed separately.
_TENSOR_REBUILD_FUNCTIONS = (
    '_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3', '_rebuild_parameter',
    '_rebuild_parameter_with_state', '_rebuild_sparse_tensor', '_rebuild_qtensor',
    '_rebuild_meta_tensor_no_storage', '_rebuild_nested_tensor', '_rebuild_wrapper_subclass',
    '_rebuild_device_tensor_from_numpy', '_rebuild_device_tensor_from_cpu_tensor',
)


def _pickle_name(obj: Any) -> str:
    """The ``module.name`` a pickle writes for a class or function."""
    return f'{obj.__module__}.{obj.__qualname__}'


def tensor_pickle_globals() -> Dict[str, Any]:
    """The globals that ``torch.save`` writes for tensors and their metadata, keyed as a
    pickle names them (``'torch._utils._rebuild_tensor_v2'``, ``'torch.float32'``, ...).

    The same rule on every torch: tensor, parameter and storage classes, ``torch.Size``,
    ``torch.device``, every dtype, quantisation scheme and layout (layouts pickle through
    ``torch.serialization._get_layout``), and the rebuild functions that this torch has.
    These build tensors and nothing else (torch's ``weights_only`` loader allows the same
    kinds of object); what a newer torch writes with a function that this one lacks is
    refused here as unknown.
    """
    found = {_pickle_name(obj): obj for obj in (
        torch.Tensor, torch.nn.Parameter, torch.Size, torch.device,
        torch.serialization._get_layout, torch._tensor._rebuild_from_type_v2,
        *torch._tensor_classes, *torch._storage_classes)}
    found.update({_pickle_name(getattr(torch._utils, name)): getattr(torch._utils, name)
                  for name in _TENSOR_REBUILD_FUNCTIONS if hasattr(torch._utils, name)})
    # dtypes and quantisation schemes pickle by name: str(torch.float32) == 'torch.float32'
    found.update({str(value): value for value in vars(torch).values()
                  if isinstance(value, (torch.dtype, torch.qscheme))})
    return found


def is_tracing() -> bool:
    """Whether a graph is being recorded (ONNX / TorchScript tracing, ``torch.export``).

    ``torch.compiler.is_exporting`` exists from torch 2.6; before it, ``torch.export``
    cannot be told from ``torch.compile`` (both go through dynamo), so there both count as
    tracing (:func:`is_compiling`).
    """
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return bool(is_exporting()) if is_exporting is not None else is_compiling()


def is_compiling() -> bool:
    """Whether dynamo is tracing (``torch.compile`` or ``torch.export``):
    ``torch.compiler.is_compiling`` from torch 2.3, ``torch._dynamo.is_compiling`` before."""
    check = getattr(torch.compiler, 'is_compiling', None)
    if check is None:
        # ``import torch._dynamo`` here would make ``torch`` a local name of the function
        from torch import _dynamo
        check = _dynamo.is_compiling
    return bool(check())


def autocast_state(device_type: str) -> dict:
    """The autocast state of ``device_type`` as ``torch.autocast`` keyword arguments, so
    that a hand-written backward can run under its forward's state.

    ``torch.get_autocast_dtype`` / ``torch.is_autocast_enabled(device)`` exist from
    torch 2.4; before, CPU and CUDA have functions of their own.
    """
    if hasattr(torch, 'get_autocast_dtype'):
        return dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
                    enabled=torch.is_autocast_enabled(device_type))
    if device_type == 'cpu':
        return dict(device_type='cpu', dtype=torch.get_autocast_cpu_dtype(),
                    enabled=torch.is_autocast_cpu_enabled())
    if device_type == 'cuda':
        return dict(device_type='cuda', dtype=torch.get_autocast_gpu_dtype(),
                    enabled=torch.is_autocast_enabled())
    # other devices had no autocast of their own before torch 2.4
    return dict(device_type=device_type, enabled=False)


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether CPU autocast computes in ``dtype``: torch 2.1's refuses float16 (it has
    bfloat16 only), later releases have both."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with torch.autocast('cpu', dtype=dtype):
                return torch.mm(torch.ones(1, 1), torch.ones(1, 1)).dtype == dtype
    except RuntimeError:
        return False


def onnx_export_torchscript(model: torch.nn.Module, args: tuple, f: str, **kwargs) -> None:
    """``torch.onnx.export`` with torch's TorchScript-based exporter on every torch.

    ``torch.onnx.export`` has a ``dynamo`` switch from torch 2.5 (the dynamo exporter being
    the default from 2.9); before, the TorchScript exporter is the only one. ``kwargs``
    go to ``torch.onnx.export`` as they are.
    """
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False
    torch.onnx.export(model, args, f, **kwargs)
