"""OpenMMLab's model index (model-index.yml, configs/*/metafile.yml) lists every config,
names only configs that exist, agrees with the README's results tables (which make docs
generates from it), and its published sizes agree with its counted ones."""
import re
from pathlib import Path

import pytest
import yaml

from rest_mm.cli import model_index

from testlib import REPO

CONFIG_DIRS = ('configs/detection', 'configs/segmentation')
METRIC_COLUMNS = {'box AP': 'box AP', 'mask AP': 'mask AP', 'mIoU (ms+flip)': 'mIoU(ms+flip)'}


def _models():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    models = []
    for metafile in index['Import']:
        assert (REPO / metafile).is_file(), f'model-index.yml imports missing {metafile}'
        meta = yaml.safe_load((REPO / metafile).read_text())
        collections = {c['Name'] for c in meta['Collections']}
        for model in meta['Models']:
            assert model['In Collection'] in collections, model['Name']
            models.append(model)
    return models


def _readme_rows():
    """``{config: {column: cell}}`` from the README tables that have a config column."""
    rows = {}
    for table in re.findall(r'((?:^\|.*\|\n)+)', (REPO / 'README.md').read_text(), flags=re.M):
        lines = table.strip().splitlines()
        header = [c.strip() for c in lines[0].strip('|').split('|')]
        if 'config' not in header or 'download' not in header:
            continue
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip('|').split('|')]
            row = dict(zip(header, cells))
            rows[row['config'].strip('`')] = row
    return rows


def test_every_config_is_listed_once_and_every_listed_config_exists():
    listed = [m['Config'] for m in _models()]
    assert len(listed) == len(set(listed))
    configs = sorted(str(p.relative_to(REPO)) for d in CONFIG_DIRS
                     for p in (REPO / d).glob('*.py'))
    assert sorted(listed) == configs
    assert all(Path(REPO / c).stem == m['Name'] for m, c in zip(_models(), listed))


def test_published_results_and_weights_equal_the_readme():
    rows = _readme_rows()
    published = [m for m in _models() if 'Results' in m]
    assert sorted(m['Config'] for m in published) == sorted(rows)
    for model in published:
        row = rows[model['Config']]
        metrics = {k: v for r in model['Results'] for k, v in r['Metrics'].items()}
        for column, metric in METRIC_COLUMNS.items():
            if column in row and row[column] != '–':
                assert float(row[column]) == metrics[metric], (model['Name'], column)
        assert f'({model["Weights"]})' in row['download'], model['Name']
        readme_params = float(re.match(r'[\d.]+', row['params'])[0])
        assert float(model['Metadata']['Parameters'].rstrip('M')) == pytest.approx(
            readme_params, abs=0.05), model['Name']


def test_published_parameters_agree_with_our_counts():
    """Within the published figure's rounding (tests/test_configs.py counts ours)."""
    published = [m for m in _models() if 'Published Parameters' in m['Metadata']]
    assert {m['Name'] for m in published} >= {m['Name'] for m in _models() if 'Results' in m}
    for model in published:
        assert model_index.parameters(model, published=True) == pytest.approx(
            model_index.parameters(model), abs=0.05), model['Name']


def test_docs_say_how_to_evaluate_every_released_model():
    """(Was test_readme_says_how_to_evaluate_every_released_model: the commands moved from
    the README to docs/released_models.md, which make docs writes.)"""
    text = (REPO / 'docs' / 'released_models.md').read_text()
    for model in _models():
        if 'Weights' in model:
            assert f'python tools/test.py {model["Config"]} ' in text, model['Name']
