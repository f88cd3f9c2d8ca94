"""rest_mm.presets: the one table of published architectures, its names, and the checks of
a custom arch."""
import re

import pytest
import torch

from rest_mm import ResT, ResTV2, convert_checkpoint
from rest_mm.presets import (
    ARCH_KEYS,
    ARCH_ZOOS,
    PRESET_NAMES,
    matching_preset,
    parse_preset_name,
    preset_name,
    resolve_arch,
)
from rest_mm.rest import BACKBONES
from rest_mm.testing import straightforward
from rest_mm.weights.backbone import backbone_key_problems


def test_models_read_the_one_table():
    assert ResT.arch_zoo is ARCH_ZOOS['ResT'] and ResTV2.arch_zoo is ARCH_ZOOS['ResTV2']
    assert all(tuple(arch) == ARCH_KEYS for zoo in ARCH_ZOOS.values() for arch in zoo.values())


def test_published_widths_and_depths():
    """The papers' tables (ARCHITECTURE.md)."""
    found = {preset_name(model, arch): (values['embed_dims'][0], values['depths'])
             for model, zoo in ARCH_ZOOS.items() for arch, values in zoo.items()}
    assert found == {
        'rest_lite': (64, (2, 2, 2, 2)), 'rest_small': (64, (2, 2, 6, 2)),
        'rest_base': (96, (2, 2, 6, 2)), 'rest_large': (96, (2, 2, 18, 2)),
        'restv2_tiny': (96, (1, 2, 6, 2)), 'restv2_small': (96, (1, 2, 12, 2)),
        'restv2_base': (96, (1, 3, 16, 3)), 'restv2_large': (128, (2, 3, 16, 2)),
    }


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_every_preset_name_round_trips(name):
    model_name, arch = parse_preset_name(name)
    assert preset_name(model_name, arch) == name
    assert parse_preset_name(name.upper()) == (model_name, arch)
    values = ARCH_ZOOS[model_name][arch]
    assert matching_preset(model_name, values['embed_dims'], values['depths']) == arch


def test_straightforward_model_builds_every_preset_in_our_shapes():
    """Its weights, converted, have exactly our keys and shapes (names and shapes only: both
    are built on the meta device)."""
    for name in PRESET_NAMES:
        model_name, arch = parse_preset_name(name)
        with torch.device('meta'):
            theirs = convert_checkpoint(straightforward.build(name).state_dict())
            ours = BACKBONES[model_name](arch=arch)
        unknown, missing, mis_shaped = backbone_key_problems(theirs, ours)
        fresh_norms = {k for k in missing if re.match(r'norm\d\.', k)}
        assert not unknown and not mis_shaped and set(missing) == fresh_norms, name


@pytest.mark.parametrize('name', ['rest', 'rest_tiny', 'restv2_lite', 'resnet_50', ''])
def test_unknown_preset_names_list_the_presets(name):
    with pytest.raises(KeyError, match='the presets are rest_lite, rest_small'):
        parse_preset_name(name)


def test_unmatched_widths_are_no_preset():
    assert matching_preset('ResT', (64, 128, 256, 512), (3, 3, 3, 3)) is None
    assert matching_preset('ResTV2', (64, 128, 256, 512), (2, 2, 2, 2)) is None


def test_resolve_arch_copies_presets_and_validates_dicts():
    arch = resolve_arch('Small', 'ResT')
    arch['depths'] = (1, 1, 1, 1)
    assert ARCH_ZOOS['ResT']['small']['depths'] == (2, 2, 6, 2)
    custom = dict(ARCH_ZOOS['ResTV2']['tiny'], depths=[1, 1, 1, 1])
    assert resolve_arch(custom, 'ResTV2')['depths'] == [1, 1, 1, 1]
    with pytest.raises(KeyError, match=r"ResTV2: unknown arch 'lite'; choose one of"):
        resolve_arch('lite', 'ResTV2')
    with pytest.raises(TypeError, match='arch must be a preset name or a dict, got int'):
        resolve_arch(3, 'ResT')
    with pytest.raises(ValueError, match='embed dim 64 is not divisible by 3 heads'):
        resolve_arch(dict(custom, embed_dims=(64, 128, 256, 512), num_heads=(3, 2, 4, 8)),
                     'ResTV2')
