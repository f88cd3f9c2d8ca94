"""Tables and helpers that several test modules share (imported as ``testlib``: the tests
folder is no package, because the mmsegmentation wheel installs a top-level ``tests``)."""
import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import mmcv
import numpy as np
import pytest
import torch
from torch import nn

from rest_mm import ResT, ResTV2, convert_checkpoint
from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets
from rest_mm.testing import straightforward
from rest_mm.weights.backbone import load_converted_state_dict

# What the library-only environments (.venv-torch2.1, .venv-torch2.14: torch, mmengine,
# mmcv-lite) lack of the pinned stack. Tests that need any of it are marked needs_full_stack
# (as `pytestmark` for a whole module): they skip there, naming what is missing, and run
# on the pinned stack (.venv), where nothing is missing.
FULL_STACK_MISSING = tuple(
    name for name, module in (('mmdet', 'mmdet'), ('mmsegmentation', 'mmseg'),
                              ("mmcv's compiled ops", 'mmcv._ext'))
    if importlib.util.find_spec(module) is None)
needs_full_stack = pytest.mark.skipif(
    bool(FULL_STACK_MISSING),
    reason=f'needs the pinned OpenMMLab stack; {", ".join(FULL_STACK_MISSING)} missing here '
           f'(a library-only environment)')

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


# ---------------------------------------------------------------------------------------
# End to end, through the command-line tools.
# ---------------------------------------------------------------------------------------
# 64x80 images keep every run to seconds per iteration on a CPU.
SPEC = ToyDataSpec(num_train=64, num_val=16, height=64, width=80, min_size=16, max_size=40,
                   max_objects=3, seed=1)
TRAINING_TIMEOUT = 1800  # seconds: a hang guard for a training run


def data_roots(root: Path, library: str) -> list:
    """--cfg-options values that point a toy config of ``library`` at the data in ``root``."""
    if library == 'mmdet':
        coco = f'{root}/toy_coco/'
        ann = f'{coco}annotations/instances_val.json'
        return [f'train_dataloader.dataset.data_root={coco}',
                f'val_dataloader.dataset.data_root={coco}',
                f'test_dataloader.dataset.data_root={coco}',
                f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    ade = f'{root}/toy_ade/'
    return [f'train_dataloader.dataset.data_root={ade}',
            f'val_dataloader.dataset.data_root={ade}',
            f'test_dataloader.dataset.data_root={ade}']


def data_options(root: Path, library: str) -> list:
    """:func:`data_roots`, and SPEC's image size."""
    if library == 'mmdet':
        scale = f'({SPEC.width},{SPEC.height})'
        return data_roots(root, library) + [
            f'train_dataloader.dataset.pipeline.2.scale={scale}',
            f'val_dataloader.dataset.pipeline.1.scale={scale}',
            f'test_dataloader.dataset.pipeline.1.scale={scale}']
    return data_roots(root, library) + [
        f'model.data_preprocessor.size=({SPEC.height},{SPEC.width})']


def run(args, timeout=600, env=None, cwd=REPO, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (``cwd`` the repository by default); it must succeed."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd, env=env, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def latest_metrics(work_dir: Path) -> dict:
    """The metrics of the latest test run, from the json mmengine writes."""
    logs = sorted(work_dir.glob('*/*.json'), key=os.path.getmtime)
    assert logs, f'no metrics json under {work_dir}'
    return json.loads(logs[-1].read_text().strip().splitlines()[-1])


# A few 48x64 images, for runs that check behaviour rather than learning.
SMALL_SPEC = ToyDataSpec(num_train=6, num_val=3, height=48, width=64, min_size=10,
                         max_size=24, max_objects=3, seed=3)


def fresh_toy_data(tmp_path) -> Path:
    """SMALL_SPEC's data under ``tmp_path/data``."""
    generate_toy_datasets(str(tmp_path / 'data'), SMALL_SPEC)
    return tmp_path / 'data'


def toy_options(data: Path, library: str) -> list:
    """``--cfg-options ...`` that point a toy config of ``library`` at the data in ``data``."""
    return ['--cfg-options'] + data_roots(data, library)


DET_CONFIG = CONFIG_DIR / 'detection' / 'mask_rcnn_rest_small_coco.py'
SEG_CONFIG = CONFIG_DIR / 'segmentation' / 'upernet_restv2_tiny_ade20k.py'


def write_image(path: Path, height: int, width: int) -> np.ndarray:
    """A BGR picture with a few flat shapes on a gradient, written to ``path``."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([(rows * 255 // height), (cols * 255 // width),
                      np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    image[height // 5:height // 2, width // 8:width // 3] = (40, 90, 200)
    centre_y, centre_x, radius = height // 2, 2 * width // 3, min(height, width) // 4
    image[(rows - centre_y) ** 2 + (cols - centre_x) ** 2 < radius ** 2] = (20, 180, 40)
    mmcv.imwrite(image, str(path))
    return image


def reference_model(name: str) -> nn.Module:
    """Our model of the reference checkpoint ``name`` (a key of REFERENCE_BY_NAME)."""
    reference = REFERENCE_BY_NAME[name]
    return ours_from_reference(reference, load_reference(reference)['state_dict'])


def reference_config(tmp_path, name, reference_arch) -> Path:
    """A config holding only the reference model's backbone, as the tools accept."""
    reference = REFERENCE_BY_NAME[name]
    config = tmp_path / f'reference_{name}.py'
    config.write_text(f'model = dict(backbone=dict(type={reference.cls.__name__!r}, '
                      f'arch={reference_arch!r}, **{reference.kwargs!r}))\n')
    return config


@functools.lru_cache(maxsize=None)
def tool_help(script: str) -> subprocess.CompletedProcess:
    """``python SCRIPT --help``, ``SCRIPT`` relative to the repository; run once a session."""
    return subprocess.run([sys.executable, str(REPO / script), '--help'], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@contextlib.contextmanager
def work_dir_held_by_another_process(work_dir: Path) -> Iterator[subprocess.Popen]:
    """A live process (yielded) that holds ``work_dir`` as a training run would
    (:func:`rest_mm.cli.safe_files.lock_work_dir`); killed at the end. It loads safe_files
    alone (the standard library only), so it starts at once."""
    import rest_mm.cli.safe_files as safe_files
    script = (f'import importlib.util, sys, time\n'
              f'spec = importlib.util.spec_from_file_location("safe_files", '
              f'{safe_files.__file__!r})\n'
              f'module = importlib.util.module_from_spec(spec)\n'
              f'spec.loader.exec_module(module)\n'
              f'module.lock_work_dir(sys.argv[1])\n'
              f'print("held", flush=True)\n'
              f'time.sleep(300)\n')
    holder = subprocess.Popen([sys.executable, '-c', script, str(work_dir)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, 'RANK': '0'})
    try:
        assert holder.stdout.readline().strip() == 'held'
        yield holder
    finally:
        holder.kill()
        holder.wait()
