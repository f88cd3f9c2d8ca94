"""Whether this machine's CPU computes bfloat16 natively, and mixed precision (``--amp``) for
the tools that offer it."""
import functools
import platform
from typing import Callable, List

import torch


def _cpuinfo_values(key: str, cpuinfo: str) -> List[str]:
    """The values of ``key`` in ``cpuinfo`` (one per logical CPU); empty where the file
    cannot be read (another OS)."""
    try:
        with open(cpuinfo) as f:
            return [line.split(':', 1)[1].strip() for line in f
                    if line.split(':', 1)[0].strip() == key]
    except OSError:
        return []


def cpu_model_name(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The CPU's model name, from ``cpuinfo`` (Linux) or the platform module.

    Args:
        cpuinfo (str): The file listing the CPU. Defaults to ``'/proc/cpuinfo'``.

    Returns:
        str: The name, or ``'unknown CPU'``.
    """
    names = _cpuinfo_values('model name', cpuinfo)
    return names[0] if names else (platform.processor() or 'unknown CPU')


def native_bf16_flags(cpuinfo: str = '/proc/cpuinfo') -> List[str]:
    """The CPU's flags that give native bfloat16 arithmetic: ``amx_bf16`` (AMX tiles) and
    ``avx512_bf16`` (AVX-512 dot products), in that order.

    Without either, torch still computes bfloat16 on the CPU, by converting to float32 and
    back around each operation: correct but usually slower than float32.

    Args:
        cpuinfo (str): The file listing the CPU's flags. Defaults to ``'/proc/cpuinfo'``
            (Linux).

    Returns:
        list[str]: The flags found; empty where there are none or the file cannot be
        read (another OS), i.e. where native bfloat16 is not known to be there.
    """
    flags = {flag for line in _cpuinfo_values('flags', cpuinfo) for flag in line.split()}
    return [flag for flag in ('amx_bf16', 'avx512_bf16') if flag in flags]


def cpu_bf16_note(cpuinfo: str = '/proc/cpuinfo') -> str:
    """One line for a tool about to compute in bfloat16 on this CPU: whether it has native
    bfloat16 (:func:`native_bf16_flags`, which reads ``cpuinfo``), and that it will be slow
    where not."""
    flags = native_bf16_flags(cpuinfo)
    if flags:
        return f'bfloat16 on the CPU: native here ({", ".join(flags)})'
    return ('bfloat16 on the CPU: NOT native here (neither amx_bf16 nor avx512_bf16 among the '
            "CPU's flags), so torch emulates it: expect it to be slow, usually slower than "
            'float32')


#: The low-precision dtype of mixed precision (``--amp``) on each device type: CPUs compute
#: bfloat16 (float16 has no fast CPU kernels and would need loss scaling to train), CUDA
#: float16, as mmengine's ``AmpOptimWrapper`` and test loop do by default.
AMP_DTYPES = {'cpu': torch.bfloat16, 'cuda': torch.float16}


def amp_dtype(device_type: str) -> torch.dtype:
    """The dtype ``--amp`` computes in on ``device_type`` (:data:`AMP_DTYPES`).

    Raises:
        ValueError: A device type without mixed precision here.
    """
    if device_type not in AMP_DTYPES:
        raise ValueError(f'mixed precision (--amp) runs on {" or ".join(AMP_DTYPES)}, not on '
                         f'{device_type!r}')
    return AMP_DTYPES[device_type]


def _to_float32(value):
    """``value`` with its bfloat16/float16 tensors made float32, through lists, tuples and
    dicts; integer tensors and other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_float32(item) for key, item in value.items()}
    return value


def _in_autocast(forward: Callable, device_type: str, dtype: torch.dtype) -> Callable:
    @functools.wraps(forward)
    def forward_in_autocast(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return _to_float32(forward(*args, **kwargs))
    return forward_in_autocast


def run_network_in_amp(model: torch.nn.Module, device_type: str) -> torch.dtype:
    """Make an mmdet/mmseg model infer in mixed precision: the forward of its backbone, neck
    and heads (every submodule named ``backbone``, ``neck`` or ``*head``) runs under
    ``torch.autocast`` in :func:`amp_dtype` and hands its outputs on in float32, so that
    what runs between and after them stays float32: box decoding (mmdet makes its anchors
    in the dtype of the head's scores, and bfloat16 would round a 1000-pixel coordinate to
    4 pixels), NMS, the resizing of segmentation logits, and the predictions the
    evaluators and visualisers read with numpy (which has no bfloat16). Changes ``model``
    in place, once; the test loop and the inferencers then call it as usual.

    Args:
        model (nn.Module): The detector or segmentor (not a DDP or TTA wrapper: they call
            it).
        device_type (str): ``'cpu'`` or ``'cuda'``, where the model runs.

    Returns:
        torch.dtype: The dtype its network now computes in.

    Raises:
        ValueError: A model with no backbone, or a device without mixed precision here.
        RuntimeError: The model already infers in mixed precision.
    """
    dtype = amp_dtype(device_type)
    if getattr(model, '_amp_dtype', None) is not None:
        raise RuntimeError(f'{type(model).__name__} already runs in mixed precision '
                           f'({model._amp_dtype})')
    if not isinstance(getattr(model, 'backbone', None), torch.nn.Module):
        raise ValueError(f'mixed precision (--amp) runs mmdet and mmseg models, which have a '
                         f'backbone; {type(model).__name__} has none')
    for name, module in model.named_modules():
        if name in ('backbone', 'neck') or name.rsplit('.', 1)[-1].endswith('head'):
            module.forward = _in_autocast(module.forward, device_type, dtype)
    model._amp_dtype = dtype
    return dtype
