"""The authors' recipes, item by item, against our configs.

``configs/recipes.yml`` is the one place the recipe facts are written (its header says what
a row holds): each row names an item, the configs it concerns, the key of the resolved
config that carries it, the authors' value and, where this repo keeps something else, our
value and why. The tests check every config's resolved values against the rows, that the
rows cover every config and that docs/recipes.md shows them, and the behaviour behind the
values that need it (which parameters get weight decay, the learning-rate curves, the
authors' test-time resize, ``tools/test.py --tta``).
"""
import re
import warnings
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)
from rest_mm.cli.make_docs import RECIPES, recipe_table

from testlib import CONFIG_DIR, REPO, needs_full_stack

pytestmark = needs_full_stack


def _recipe() -> List[dict]:
    """The rows of configs/recipes.yml, each with ``paths``: its configs, groups expanded."""
    recipes = yaml.safe_load((REPO / RECIPES).read_text())
    groups = recipes['groups']
    rows = []
    for row in recipes['rows']:
        unknown = [c for c in row['configs'] if '/' not in c and c not in groups]
        assert not unknown, f'{row["item"]}: no group named {unknown} in {RECIPES}'
        paths = [p for c in row['configs'] for p in (groups[c] if c in groups else [c])]
        rows.append(dict(row, paths=paths))
    return rows


RECIPE = _recipe()
UPERNET = {a: f'segmentation/upernet_restv2_{a}_ade20k.py' for a in ('tiny', 'small', 'base')}
UPERNET_ALIGN32 = {a: f'segmentation/upernet_restv2_{a}_ade20k_align32.py' for a in UPERNET}


def _plain(value):
    """Config values as plain lists and dicts (tuples and ConfigDicts compare as such)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve(node, key: str):
    """The value at ``key`` (syntax: configs/recipes.yml) in a config; None if missing."""
    if key.startswith('{') and key.endswith('}') and key.count('{') == 1:
        # a dict of whole keys, e.g. {train_dataloader.batch_size,crop_size}
        return {k: resolve(node, k) for k in key[1:-1].split(',')}
    parts = re.findall(r'\{[^}]*\}|[^.]+', key)
    for i, part in enumerate(parts):
        if node is None:
            return None
        if part.startswith('{'):
            return {k: _plain(node.get(k)) for k in part[1:-1].split(',')}
        if part == '*':
            rest = '.'.join(parts[i + 1:])
            return [resolve(element, rest) if rest else _plain(element) for element in node]
        selector = re.fullmatch(r'(\w+)\[(\w+)\]', part)
        if selector:
            matches = [t for t in node.get(selector[1], []) if t.get('type') == selector[2]]
            assert len(matches) == 1, f'{key}: {len(matches)} elements of type {selector[2]}'
            node = matches[0]
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        else:
            node = node.get(part)
    return _plain(node)


def _cases():
    for index, row in enumerate(RECIPE):
        for path in row['paths']:
            yield pytest.param(index, path, id=f'{index}-{Path(path).stem}')


_CONFIGS = {}


def load(path: str) -> Config:
    if path not in _CONFIGS:
        _CONFIGS[path] = Config.fromfile(CONFIG_DIR / path)
    return _CONFIGS[path]


@pytest.mark.parametrize('index,path', list(_cases()))
def test_config_follows_the_recipe(index, path):
    row = RECIPE[index]
    expected = row.get('ours', row['authors'])
    assert resolve(load(path), row['key']) == _plain(expected), f'{row["item"]}: {path}'


def test_rows_that_differ_say_why_and_rows_that_match_do_not():
    for row in RECIPE:
        assert bool(row.get('why')) == ('ours' in row), row['item']
        assert 'ours' not in row or _plain(row['ours']) != _plain(row['authors']), row['item']


def test_every_released_recipe_config_is_in_the_table():
    covered = {path for row in RECIPE for path in row['paths']}
    shipped = {str(p.relative_to(CONFIG_DIR)) for sub in ('detection', 'segmentation')
               for p in (CONFIG_DIR / sub).glob('*.py')}
    # The ResT v1 UperNets have no recipe of the authors' (they released none).
    without_recipe = {'segmentation/upernet_rest_small_ade20k.py',
                      'segmentation/upernet_rest_base_ade20k.py'}
    assert covered == shipped - without_recipe


def test_docs_recipes_page_lists_the_recipe_table():
    """(Was test_readme_configs_section_lists_the_recipe_table: the table moved from the
    README's "Configs" to docs/recipes.md, which make docs writes.)"""
    page = (REPO / 'docs' / 'recipes.md').read_text().splitlines()
    table = [line for line in page if line.startswith('| recipe item')]
    assert table, 'docs/recipes.md has no recipe table'
    start = page.index(table[0])
    lines = page[start:start + len(RECIPE) + 2]
    assert lines == recipe_table()
    assert all(line.startswith(f'| {row["item"]} ({row["models"]}) |')
               for line, row in zip(lines[2:], RECIPE))


# --- behaviour behind the values -------------------------------------------------------
def _build(cfg: Config):
    import importlib

    from mmengine.model import revert_sync_batchnorm
    scope = cfg.default_scope
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope(scope):
        model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    return revert_sync_batchnorm(model)


def _weight_decays(cfg: Config, model) -> dict:
    from mmengine.optim import build_optim_wrapper
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU; the groups are the same
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        optim_wrapper = build_optim_wrapper(model, optim_cfg)
    by_id = {id(p): group['weight_decay'] for group in optim_wrapper.param_groups
             for p in group['params']}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


# detectron2's get_default_optimizer_params: these module types get WEIGHT_DECAY_NORM.
D2_NORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                 torch.nn.SyncBatchNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm1d,
                 torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
                 torch.nn.LocalResponseNorm)


@pytest.mark.parametrize('path', ['detection/retinanet_rest_small_coco.py',
                                  'detection/mask_rcnn_rest_small_coco.py',
                                  'detection/mask_rcnn_restv2_tiny_3x_coco.py'])
def test_weight_decay_as_detectron2_gave_it(path):
    """detectron2 exempts the parameters of modules of its norm types; the authors' model
    has our module types except the ResTv2 output norms, a class of theirs (so decayed)."""
    cfg = load(path).copy()
    model = _build(cfg)
    decays = _weight_decays(cfg, model)
    v2 = cfg.model.backbone.type == 'ResTV2'
    expected = {}
    for module_name, module in model.named_modules():
        authors_class_is_norm = isinstance(module, D2_NORM_TYPES) and not (
            v2 and re.fullmatch(r'backbone\.norm\d', module_name))
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                expected[f'{module_name}.{name}'] = 0.0 if authors_class_is_norm else 0.05
    assert decays == expected
    assert v2 == any(d == 0.05 for n, d in decays.items() if n.startswith('backbone.norm'))


def test_weight_decay_as_mmseg0x_gave_it_to_the_authors_names(reference_dir):
    """mmseg 0.x's custom key 'norm' exempts the parameters whose name, in the authors'
    model, contains 'norm': translate our backbone's names back to theirs."""
    import json

    from rest_mm.weights import convert_checkpoint
    keys = json.loads((reference_dir / 'reference_checkpoint_keys.json').read_text())
    authors_keys = [k for k in keys['restv2_tiny'] if not k.startswith(('head.', 'norm.'))]
    authors_keys += [f'norm_{i}.{p}' for i in range(1, 5) for p in ('weight', 'bias')]
    tensors = {k: torch.zeros(1) for k in authors_keys}
    ours_to_authors = {ours: authors_keys[[id(t) for t in tensors.values()].index(id(v))]
                       for ours, v in convert_checkpoint(tensors).items()}

    cfg = load(UPERNET['tiny']).copy()
    model = _build(cfg)
    decays = _weight_decays(cfg, model)
    stem_bn_checked = False
    for name, decay in decays.items():
        authors_name = (ours_to_authors[name[len('backbone.'):]] if name.startswith('backbone.')
                        else name)  # mmseg 0.x's heads: the same names (test_weights_mmseg0x)
        assert decay == (0.0 if 'norm' in authors_name else 0.01), (name, authors_name)
        stem_bn_checked |= authors_name == 'stem.proj.1.weight' and decay == 0.01
    assert stem_bn_checked


def _lr_curve(param_scheduler: list, iterations: int) -> np.ndarray:
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    wrapper = OptimWrapper(optimizer)
    schedulers = [PARAM_SCHEDULERS.build(dict(cfg, optimizer=wrapper)) for cfg in param_scheduler]
    lrs = np.empty(iterations)
    group = optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # no optimizer.step() between the scheduler steps
        for i in range(iterations):
            lrs[i] = group['lr']
            for scheduler in schedulers:
                scheduler.step()
    return lrs


def test_detection_learning_rate_is_detectron2s_warmup_multistep():
    """detectron2's WarmupMultiStepLR: base x warm-up factor (linear from WARMUP_FACTOR 0.001
    over WARMUP_ITERS 1000) x GAMMA ** (steps passed), iteration by iteration."""
    end = 90000
    t = np.arange(end)
    alpha = np.minimum(t / 1000, 1.0)
    expected = (0.001 * (1 - alpha) + alpha) * 0.1 ** ((t >= 60000).astype(int) + (t >= 80000))
    schedule = load('detection/mask_rcnn_rest_small_coco.py').param_scheduler
    np.testing.assert_allclose(_lr_curve(schedule, end), expected, rtol=1e-6)


def test_segmentation_learning_rate_is_mmcv1s_poly_with_warmup():
    """mmcv 1.x's poly schedule with linear warm-up: base x (1 - t / 160000) ** 1, times
    (1 - (1 - t / 1500) (1 - 1e-6)) during the warm-up, iteration by iteration."""
    end = 160000
    t = np.arange(end)
    warm = np.where(t < 1500, 1 - (1 - t / 1500) * (1 - 1e-6), 1.0)
    expected = (1 - t / end) * warm
    schedule = load(UPERNET['tiny']).param_scheduler
    np.testing.assert_allclose(_lr_curve(schedule, end), expected, rtol=1e-5, atol=1e-12)


def test_align32_config_segments_at_multiples_of_32():
    """Through the config's own test pipeline: a 512x683 image reaches the model as
    512x704 (natural-size config: 512x683)."""
    from mmengine.dataset import Compose
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    for path, width in ((UPERNET_ALIGN32['tiny'], 704), (UPERNET['tiny'], 683)):
        cfg = load(path)
        with DefaultScope.overwrite_default_scope('mmseg'):
            import rest_mm.transforms  # noqa: F401  (what the align32 configs import)
            pipeline = Compose([t for t in cfg.test_dataloader.dataset.pipeline
                                if t.type not in ('LoadImageFromFile', 'LoadAnnotations')])
            image = np.zeros((512, 683, 3), dtype=np.uint8)
            packed = pipeline(dict(img=image, img_shape=image.shape[:2],
                                   ori_shape=image.shape[:2]))
        assert tuple(packed['inputs'].shape) == (3, 512, width), path
