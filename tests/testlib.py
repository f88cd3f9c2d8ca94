"""Tables and helpers that several test modules share (imported as ``testlib``: the tests
folder is no package, because the mmsegmentation wheel installs a top-level ``tests``)."""
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import nn

from rest_mm import ResT, ResTV2, convert_checkpoint
from rest_mm.checkpoint import load_converted_state_dict
from rest_mm.testing import straightforward

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs'
TOOLS_DIR = REPO / 'tools'
TOY_CONFIG_DIR = CONFIG_DIR / 'toy'
REFERENCE_DIR = Path(__file__).parent / 'data' / 'reference'
# The reference models' shape (see tests/data/reference/README.md).
REFERENCE_ARCH = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                      sr_ratios=(8, 4, 2, 1), mlp_ratio=4.)


class Reference(NamedTuple):
    """A reference checkpoint with the stage maps the authors' code computed from it."""
    name: str
    file: str
    cls: type
    kwargs: dict
    version: int


REFERENCES = [
    Reference('v1', 'rest_v1_tiny.pt', ResT, dict(apply_transform=True), 1),
    Reference('v1_no_transform', 'rest_v1_tiny_no_transform.pt', ResT,
              dict(apply_transform=False), 1),
    Reference('v2', 'rest_v2_tiny.pt', ResTV2, {}, 2),
]
REFERENCE_BY_NAME = {r.name: r for r in REFERENCES}
REFERENCE_IDS = [r.file for r in REFERENCES]


def as_ours(model: nn.Module, stage_maps: Sequence[torch.Tensor]) -> list:
    """The authors' stage maps as our outputs present them: through the model's output
    norms where they are fresh (stages the ImageNet model has no norm for)."""
    return [getattr(model, f'norm{i}')(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if i in model.fresh_norm_indices else m for i, m in enumerate(stage_maps)]


def load_reference(reference: Reference) -> dict:
    """The reference file: ``state_dict`` (the authors' keys) and ``cases`` (inputs with
    the stage maps their code computed)."""
    return torch.load(REFERENCE_DIR / reference.file, weights_only=True)


def ours_from_reference(reference: Reference, state_dict: dict) -> nn.Module:
    """Our model of the reference's shape, in eval mode, with the converted weights."""
    model = reference.cls(arch=REFERENCE_ARCH, **reference.kwargs).eval()
    load_converted_state_dict(model, convert_checkpoint(state_dict))
    return model


def straightforward_from_reference(reference: Reference, state_dict: dict) -> nn.Module:
    """The straightforward model of the reference's shape, in eval mode, with the authors'
    weights loaded under their own names (the classifier head left out)."""
    arch = REFERENCE_ARCH
    model = straightforward.StraightforwardResT(
        reference.version, arch['embed_dims'], arch['depths'], arch['num_heads'],
        arch['sr_ratios'], apply_transform=reference.kwargs.get('apply_transform', True))
    weights = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def randomised_detection_backbone(version, reference_arch):
    """The authors' detectron2 backbone (straightforward, float64) with every output norm's
    affine parameters drawn at random, so that no norm is close to the identity."""
    model = straightforward.StraightforwardResT(
        version, reference_arch['embed_dims'], reference_arch['depths'],
        reference_arch['num_heads'], reference_arch['sr_ratios'], detection_norms=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith('norm'):
                param.copy_(torch.randn_like(param) * 0.5 + (1. if name.endswith('weight') else 0))
    return model.double().eval()
