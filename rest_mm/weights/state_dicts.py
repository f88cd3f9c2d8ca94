"""State dicts inside loaded checkpoints: unwrapped, checked to be tensors, checked finite."""
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it was given: unreadable, damaged, holding values
    that are not (finite) tensors, or not fitting the model; the message names the file,
    the keys at fault and what is accepted."""


# The entries that checkpoint files keep their state dict under: mmengine's (and ours)
# ``state_dict``, the authors' ImageNet and detectron2 files ``model``.
WRAPPER_KEYS = ('state_dict', 'model')


def unwrap_checkpoint(checkpoint: Mapping, wrappers: Sequence[str] = WRAPPER_KEYS
                      ) -> Dict[str, Any]:
    """The state dict inside a loaded checkpoint, however deeply wrapped, with the
    ``module.`` that a DDP-wrapped model's keys start with removed.

    Args:
        checkpoint (Mapping): A loaded file or a state dict.
        wrappers (Sequence[str]): The entries that may hold it, in order of preference.
            Defaults to :data:`WRAPPER_KEYS`.

    Raises:
        ValueError: A wrapper that contains itself (``d['model'] = d``, or a longer
            cycle), which would otherwise be unwrapped for ever.
    """
    seen = set()
    while True:
        seen.add(id(checkpoint))
        key = next((k for k in wrappers if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            break
        checkpoint = checkpoint[key]
        if id(checkpoint) in seen:
            raise ValueError(f"the checkpoint's {key!r} entry leads back to a dict that "
                             f'contains it (a cycle); expected a state dict, possibly wrapped '
                             f"as {{'state_dict': ...}} or {{'model': ...}}")
    return {(k[len('module.'):] if k.startswith('module.') else k): v
            for k, v in checkpoint.items()}


def listed(items: Sequence[str], most: int = 8) -> str:
    """The first ``most`` items, and how many there are when that is not all."""
    return ', '.join(items[:most]) + (f', ... ({len(items)} in all)' if len(items) > most else '')


def as_tensors(state_dict: Mapping, source: str) -> Dict[str, torch.Tensor]:
    """The values as tensors (numpy arrays, as detectron2's ``.pkl`` files hold, are
    converted); anything else is an error naming the keys."""
    tensors, others = {}, []
    for key, value in state_dict.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in 'biufc':
            # np.ascontiguousarray would turn a 0-d array (num_batches_tracked) into 1-d
            value = torch.from_numpy(value if value.flags.c_contiguous else value.copy())
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            others.append(f'{key} ({type(value).__name__})')
    if others:
        raise CheckpointError(f'{source}: values that are not tensors: {listed(others)}; a '
                              f'state dict maps parameter names to tensors (or numpy arrays)')
    return tensors


def check_finite(state_dict: Mapping, source: str,
                 opt_out: str = "allow_non_finite=True (in a config: in the backbone's "
                                "init_cfg)") -> None:
    """Refuse weights holding NaN or Inf: a damaged file or a diverged run, which would
    otherwise load without a word (torch's CPU attention even turns NaN query rows into
    zeros, so early feature maps stay finite and hide it).

    Args:
        state_dict (Mapping): Names to tensors; values of other types are not looked at.
        source (str): The file's name, for the message.
        opt_out (str): How the caller loads anyway, for the message. Defaults to naming
            the ``allow_non_finite`` argument of the loaders.

    Raises:
        CheckpointError: Naming the tensors with non-finite values and how many each holds.
    """
    bad = []
    for key, value in state_dict.items():
        if (isinstance(value, torch.Tensor) and not value.is_meta
                and (value.is_floating_point() or value.is_complex())):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                nan = int(torch.isnan(value).sum())
                bad.append(f'{key} ({nan} NaN, {value.numel() - int(finite.sum()) - nan} Inf '
                           f'of {value.numel()})')
    if bad:
        raise CheckpointError(f'non-finite values in {len(bad)} tensor(s) of {source}: '
                              f'{listed(bad)}; the file is damaged or from a diverged run. To '
                              f'use it anyway, pass {opt_out}.')
