"""The published ResT and ResTv2 architectures: the one table that the models, the
checkpoint converter, the tools and the tests read.

A preset is named by the model class and an arch (``ResT``, ``'small'``), or, on the
command line, by one word (``'rest_small'``, ``'restv2_tiny'``).
"""
import copy
import math
from typing import Dict, Optional, Sequence, Tuple, Union

NUM_STAGES = 4  # strides 4, 8, 16, 32
ARCH_KEYS = ('embed_dims', 'depths', 'num_heads', 'sr_ratios', 'mlp_ratio')


def _arch(embed_dims, depths, num_heads=(1, 2, 4, 8)) -> dict:
    return dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, sr_ratios=(8, 4, 2, 1),
                mlp_ratio=4.)


ARCH_ZOOS: Dict[str, Dict[str, dict]] = {
    'ResT': {
        'lite': _arch((64, 128, 256, 512), (2, 2, 2, 2)),
        'small': _arch((64, 128, 256, 512), (2, 2, 6, 2)),
        'base': _arch((96, 192, 384, 768), (2, 2, 6, 2)),
        'large': _arch((96, 192, 384, 768), (2, 2, 18, 2)),
    },
    'ResTV2': {
        'tiny': _arch((96, 192, 384, 768), (1, 2, 6, 2)),
        'small': _arch((96, 192, 384, 768), (1, 2, 12, 2)),
        'base': _arch((96, 192, 384, 768), (1, 3, 16, 3)),
        'large': _arch((128, 256, 512, 1024), (2, 3, 16, 2), num_heads=(2, 4, 8, 16)),
    },
}

_NAME_PREFIXES = {'ResT': 'rest_', 'ResTV2': 'restv2_'}


def preset_name(model_name: str, arch: str) -> str:
    """``('ResT', 'small')`` -> ``'rest_small'``."""
    return _NAME_PREFIXES[model_name] + arch


_PRESETS_BY_NAME = {preset_name(model, arch): (model, arch)
                    for model, zoo in ARCH_ZOOS.items() for arch in zoo}
PRESET_NAMES: Tuple[str, ...] = tuple(_PRESETS_BY_NAME)


def parse_preset_name(name: str) -> Tuple[str, str]:
    """``'rest_small'`` -> ``('ResT', 'small')`` (any letter case).

    Raises:
        KeyError: ``name`` is no preset; the message lists them.
    """
    try:
        return _PRESETS_BY_NAME[name.lower()]
    except KeyError:
        raise KeyError(f'unknown preset {name!r}; the presets are '
                       f'{", ".join(PRESET_NAMES)}') from None


def matching_preset(model_name: str, embed_dims: Sequence, depths: Sequence) -> Optional[str]:
    """The arch of ``model_name`` with these widths and depths, or None."""
    return next((arch for arch, values in ARCH_ZOOS[model_name].items()
                 if values['embed_dims'] == tuple(embed_dims)
                 and values['depths'] == tuple(depths)), None)


def is_whole_number(value) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_arch(arch: Union[str, dict], model_name: str) -> dict:
    """A preset of ``model_name`` by arch name, or a user dict validated to have exactly
    the keys of :data:`ARCH_KEYS` and values that build a model (positive whole numbers,
    heads that divide the widths).

    Raises:
        KeyError: An unknown preset, or missing/unknown keys.
        TypeError: ``arch`` is neither a name nor a dict.
        ValueError: A value that builds no model.
    """
    zoo = ARCH_ZOOS[model_name]
    if isinstance(arch, str):
        if arch.lower() not in zoo:
            raise KeyError(f'{model_name}: unknown arch {arch!r}; choose one of '
                           f'{sorted(zoo)} or pass a dict with keys {list(ARCH_KEYS)}')
        return copy.deepcopy(zoo[arch.lower()])
    if not isinstance(arch, dict):
        raise TypeError(f'{model_name}: arch must be a preset name or a dict, got '
                        f'{type(arch).__name__}')
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = [k for k in arch if k not in ARCH_KEYS]
    if missing or unknown:
        raise KeyError(f'{model_name}: custom arch has missing keys {missing} and unknown keys '
                       f'{unknown}; the keys are {list(ARCH_KEYS)}')
    arch = copy.deepcopy(arch)
    for key in ('embed_dims', 'depths', 'num_heads', 'sr_ratios'):
        values = arch[key]
        if not isinstance(values, (list, tuple)) or len(values) != NUM_STAGES:
            raise ValueError(f'{model_name}: arch[{key!r}] needs one value per stage '
                             f'({NUM_STAGES}), got {values}')
        if not all(is_whole_number(v) and v >= 1 for v in values):
            raise ValueError(f'{model_name}: arch[{key!r}] must be {NUM_STAGES} whole numbers '
                             f'>= 1, got {values}')
    mlp_ratio = arch['mlp_ratio']
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or \
            not math.isfinite(mlp_ratio) or int(min(arch['embed_dims']) * mlp_ratio) < 1:
        raise ValueError(f'{model_name}: arch[\'mlp_ratio\'] must be a positive number (hidden '
                         f'width = embed dim x mlp_ratio >= 1), got {mlp_ratio!r}')
    for dim, heads in zip(arch['embed_dims'], arch['num_heads']):
        if dim % heads:
            raise ValueError(f'{model_name}: embed dim {dim} is not divisible by {heads} heads')
    return arch
