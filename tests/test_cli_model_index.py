"""rest_mm.cli.model_index: the one reader of the model index, and its numbers' format."""
import pytest

from rest_mm.cli import model_index

from testlib import REPO


def test_every_model_has_counts_and_published_figures_parse():
    models = model_index.models(REPO)
    assert len(models) == len({m['Config'] for m in models}) > 0
    for model in models:
        assert model_index.parameters(model) > 0 and model_index.flops(model) > 0
        published = model_index.parameters(model, published=True)
        assert published is None or published > 0
    published = [m['Name'] for m in models if model_index.flops(m, published=True)]
    assert 'upernet_restv2_tiny_ade20k' in published


def test_malformed_numbers_and_missing_index_are_errors(tmp_path):
    model = {'Name': 'x', 'Metadata': {'Parameters': '23.4 M', 'FLOPs': '12'}}
    with pytest.raises(ValueError, match=r"x: Parameters '23.4 M' is not a number followed by 'M'"):
        model_index.parameters(model)
    with pytest.raises(ValueError, match="x: FLOPs '12' is not a number followed by 'G'"):
        model_index.flops(model)
    with pytest.raises(FileNotFoundError, match='model-index.yml does not exist'):
        model_index.models(tmp_path)
    (tmp_path / 'model-index.yml').write_text('Import:\n  - configs/x/metafile.yml\n')
    with pytest.raises(FileNotFoundError, match='imports configs/x/metafile.yml, which does not'):
        model_index.models(tmp_path)
